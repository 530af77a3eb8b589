"""The systemd side: sd_notify over a real socket, the unit's checks, the install script's steps."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import DAEMON_COMMAND
from hematovision.edge.service.daemon import EX_CONFIG
from hematovision.edge.service.notify import Notifier, socket_address, watchdog_interval_s

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "hematovision.service"
INSTALL = REPO / "systemd" / "install.sh"
MAX_EXPOSURE = 3.0


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return tool


# --- sd_notify ---------------------------------------------------------------------------

def test_running_daemon_sends_ready_status_watchdog_and_stopping_to_a_real_socket(
        daemon_config, notify_listener, tmp_path):
    config = daemon_config(source__replay={"fps": 20.0, "loop": True})
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *DAEMON_COMMAND, str(config)], env=env, stdout=out, stderr=out,
                                cwd=tmp_path)
    try:
        ready = notify_listener.wait_for("READY", 30)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert notify_listener.wait_for("WATCHDOG", 5)["WATCHDOG"] == "1"
        status = notify_listener.wait_for("STATUS", 5)["STATUS"]
        assert re.fullmatch(r"specimen S-1: \d+/100000 cells, \d+ unidentified", status), status
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-2000:]
    stopping = notify_listener.wait_for("STOPPING", 5)
    assert stopping["STATUS"].startswith("stopped; specimen S-1")


def test_notifier_reaches_abstract_sockets_and_is_silent_outside_systemd():
    name = f"hv-test-{os.getpid()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(b"\0" + name.encode())
    try:
        with Notifier({"NOTIFY_SOCKET": "@" + name}) as notifier:
            notifier.status("counting")
        assert server.recv(100) == b"STATUS=counting"
    finally:
        server.close()
    with Notifier({}) as silent:
        assert silent.send("READY=1") is False
    assert socket_address("@x") == b"\0x" and socket_address("/run/n") == "/run/n"


def test_watchdog_interval_is_read_only_for_this_process():
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval_s({}) is None


def test_waiting_pings_the_watchdog_and_ends_at_once_on_stop(notify_listener):
    stop = threading.Event()
    with Notifier({"NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": "200000"}) as notifier:
        assert notifier.wait(stop, 0.3) is False
        threading.Timer(0.05, stop.set).start()
        assert notifier.wait(stop, 30) is True
    pings = 0
    while notify_listener.receive(0.01) is not None:
        pings += 1
    assert pings >= 3


# --- the unit ----------------------------------------------------------------------------

def test_unit_is_a_watched_notify_service_of_a_dedicated_user():
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["WatchdogSec"] and s["Restart"] == ["on-failure"]
    assert s["User"] == ["hematovision"] and s["SupplementaryGroups"] == ["video dialout"]
    assert s["StateDirectory"] == ["hematovision"] and s["RestartSec"]
    assert s["RestartPreventExitStatus"] == [str(EX_CONFIG)]
    assert "check-config --config /etc/hematovision/config.toml" in s["ExecStartPre"][0]
    assert s["ExecStart"][0].endswith("hematovision-edge run --config /etc/hematovision/config.toml")
    assert "PrivateDevices" not in s and s["DevicePolicy"] == ["closed"]
    assert "char-video4linux rw" in s["DeviceAllow"] and "char-ttyGS rw" in s["DeviceAllow"]


def test_unit_watchdog_and_the_configured_one_are_the_same_interval():
    from hematovision.edge.config import Config, load_config

    example = load_config(REPO / "systemd" / "config.example.toml")
    assert float(unit_settings()["WatchdogSec"][0]) == example.service.watchdog_s == Config().service.watchdog_s


def _stub_root(tmp_path: Path) -> Path:
    """A root with the unit, a stub of its executable and the host's own units (for its dependencies)."""
    root = tmp_path / "root"
    exe = root / "opt/hematovision/venv/bin/hematovision-edge"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    host_units = next((p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()), None)
    if host_units is None:
        pytest.skip("no systemd unit folder on this machine")
    shutil.copytree(host_units, root / "usr/lib/systemd/system", symlinks=True)
    return root


def test_systemd_analyze_verify_passes_on_the_unit(tmp_path):
    tool = systemd_analyze()
    root = _stub_root(tmp_path)
    result = subprocess.run([tool, "verify", f"--root={root}", UNIT.name], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_systemd_analyze_security_exposure_is_at_most_3(tmp_path):
    tool = systemd_analyze()
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout + result.stderr)
    assert found, result.stdout[-2000:] + result.stderr
    print(f"\nsystemd-analyze security: exposure {found.group(1)}")
    assert float(found.group(1)) <= MAX_EXPOSURE


# --- the install script ------------------------------------------------------------------

def dry_run(*args: str) -> str:
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_install_dry_run_prints_every_step_in_order_and_changes_nothing(tmp_path):
    prefix = tmp_path / "opt"
    out = dry_run("--prefix", str(prefix))
    order = ["apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-numpy "
             "python3-picamera2", f"python3 -m venv --system-site-packages {prefix}/venv",
             "numpy<2", "opencv-python-headless==4.11.0.86", f"--constraint {prefix}/constraints.txt",
             "assert numpy.__version__.startswith('1.')", "useradd --system --user-group --groups video,dialout",
             "write /etc/hematovision/config.toml", f'bundle = "{prefix}/src/models/reference"',
             f'path = "{prefix}/src/samples/bccd/BCCD/JPEGImages"', "write /etc/systemd/system/hematovision.service",
             f"ExecStart={prefix}/venv/bin/hematovision-edge run", "check-config --config /etc/hematovision/config.toml",
             "systemctl daemon-reload", "systemctl enable --now hematovision.service"]
    at = 0
    for step in order:
        found = out.find(step, at)
        assert found >= 0, f"{step!r} missing or out of order"
        at = found
    assert not prefix.exists() and "dtoverlay=dwc2" not in out


def test_install_dry_run_with_usb_gadget_sets_up_dwc2_and_g_serial():
    out = dry_run("--usb-gadget", "--no-enable")
    assert "dtoverlay=dwc2" in out and "write /etc/modules-load.d/hematovision-gadget.conf" in out
    assert "g_serial" in out and "/dev/ttyGS0" in out and "systemctl enable" not in out.split("not enabled")[0]


def test_install_script_refuses_unknown_options():
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr
