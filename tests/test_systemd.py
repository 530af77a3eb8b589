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
        assert re.fullmatch(r"specimen S-1: \d+/100000 cells, \d+ unidentified(; [^;].*)?", status), status
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

RELEASES = {"bookworm": ("12", "numpy<2", "opencv-python-headless==4.11.0.86", "ai-edge-litert==1.4.0", "1."),
            "trixie": ("13", "numpy<2.3", "opencv-python-headless==4.12.0.88", "ai-edge-litert==2.3.0", "2.")}


def os_release(folder: Path, codename: str, version: str = "") -> Path:
    """An os-release file of Raspberry Pi OS (Debian) `codename`."""
    path = folder / f"os-release-{codename}"
    path.write_text(f'PRETTY_NAME="Debian GNU/Linux {version} ({codename})"\nNAME="Debian GNU/Linux"\n'
                    f'VERSION_ID="{version}"\nVERSION_CODENAME={codename}\nID=debian\n')
    return path


def dry_run(tmp_path: Path, *args: str, release: str = "bookworm", env: dict | None = None) -> str:
    """The install script's dry run for `release`, with no camera to be found unless `env` provides one."""
    cameras = tmp_path / "no-cameras"
    cameras.mkdir(exist_ok=True)
    environment = {**os.environ, "HEMATOVISION_V4L_SYSFS": str(cameras), **(env or {})}
    environment.pop("SUDO_USER", None)
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", "--os-release",
                             str(os_release(tmp_path, release, RELEASES.get(release, ("0",))[0])), *args],
                            capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    return result.stdout


def in_order(out: str, steps: list[str]) -> None:
    at = 0
    for step in steps:
        found = out.find(step, at)
        assert found >= 0, f"{step!r} missing or out of order"
        at = found


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_install_dry_run_prints_every_step_in_order_and_changes_nothing(tmp_path, release):
    _, numpy_pin, opencv_pin, litert_pin, numpy_major = RELEASES[release]
    prefix = tmp_path / "opt"
    out = dry_run(tmp_path, "--prefix", str(prefix), "--source", "picamera2", release=release)
    in_order(out, [
        "apt-get install -y --no-install-recommends python3 python3-venv python3-pip python3-numpy python3-picamera2",
        f"python3 -m venv --system-site-packages {prefix}/venv", numpy_pin, opencv_pin, litert_pin,
        f"--constraint {prefix}/constraints.txt", f"assert numpy.__version__.startswith('{numpy_major}')",
        f"ln -sfn {prefix}/venv/bin/hematovision-edge /usr/local/bin/hematovision-edge",
        "useradd --system --user-group --groups video,dialout", "write /etc/hematovision/config.toml",
        'kind = "picamera2"', 'bundle = ""  ',
        "write /etc/systemd/system/hematovision.service", f"ExecStart={prefix}/venv/bin/hematovision-edge run",
        "UMask=0027", "systemctl daemon-reload", "check-config --config /etc/hematovision/config.toml",
        "systemctl enable --now hematovision.service", "== done. Next:"])
    assert not prefix.exists() and "dtoverlay=dwc2" not in out


def test_install_dry_run_refuses_a_release_it_has_no_pins_for(tmp_path):
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", "--os-release", str(os_release(tmp_path, "bullseye", "11"))],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "supported: Raspberry Pi OS Bookworm (Debian 12) and Trixie (Debian 13)" in result.stderr


def _installed_config(out: str) -> str:
    """The configuration file the dry run would write, as TOML text."""
    block = out.split("+ write /etc/hematovision/config.toml (mode 0644):\n", 1)[1].splitlines()
    end = next(i for i, line in enumerate(block) if not line.startswith("|"))
    return "\n".join(line[4:] for line in block[:end])


def _checked(tmp_path: Path, text: str):
    """The installed configuration, loaded and checked as check-config would (minus the devices)."""
    import tomllib

    from hematovision.edge.config import load_config

    data = tomllib.loads(text)
    assert data["model"]["bundle"] == ""  # the bundle `model install` installed, else the package's reference
    data["source"]["replay"]["path"] = str(REPO / "samples" / "bccd" / "BCCD" / "JPEGImages")
    path = tmp_path / "installed.toml"
    from conftest import toml_text

    path.write_text(toml_text({k: v for k, v in _flat(data).items()}))
    return load_config(path)


def _flat(data: dict, prefix: str = "") -> dict:
    """TOML tables as {"source.replay": {...}} for toml_text."""
    out = {prefix.rstrip("."): {k: v for k, v in data.items() if not isinstance(v, dict)}} if prefix else {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("release", sorted(RELEASES))
def test_installed_configuration_names_a_camera_source_not_the_replay(tmp_path, release):
    config = _checked(tmp_path, _installed_config(dry_run(tmp_path, release=release)))
    assert config.source.kind == "picamera2"


def test_install_picks_a_detected_usb_camera_when_no_pi_camera_is_there(tmp_path):
    sysfs = tmp_path / "sysfs"
    usb = tmp_path / "devices/platform/usb1/1-1/1-1:1.0"
    codec = tmp_path / "devices/platform/soc/bcm2835-codec"
    for name, device, index in (("video10", codec, 0), ("video2", usb, 0), ("video3", usb, 1)):
        (sysfs / name).mkdir(parents=True)
        device.mkdir(parents=True, exist_ok=True)
        (sysfs / name / "device").symlink_to(device)
        (sysfs / name / "index").write_text(f"{index}\n")
    out = dry_run(tmp_path, env={"HEMATOVISION_V4L_SYSFS": str(sysfs)})
    config = _checked(tmp_path, _installed_config(out))
    assert (config.source.kind, config.source.opencv.device) == ("opencv", "/dev/video2")
    assert "the USB camera /dev/video2 was detected" in out


def test_install_picks_a_detected_pi_camera_first(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "python3").write_text("#!/bin/sh\nexit 0\n")  # picamera2 lists a camera
    (stub / "python3").chmod(0o755)
    out = dry_run(tmp_path, env={"PATH": f"{stub}:{os.environ['PATH']}"})
    assert _checked(tmp_path, _installed_config(out)).source.kind == "picamera2"
    assert "a Raspberry Pi camera was detected" in out and "systemctl enable --now" in out


def test_install_without_a_camera_enables_but_does_not_start_and_says_what_to_do(tmp_path):
    out = dry_run(tmp_path)
    assert "systemctl enable hematovision.service" in out and "enable --now" not in out
    assert "== done. Next: connect the camera" in out


def test_replay_is_an_explicit_demo_and_the_done_line_says_how_to_count_from_the_camera(tmp_path):
    out = dry_run(tmp_path, "--source", "replay")
    config = _checked(tmp_path, _installed_config(out))
    assert config.source.kind == "replay"
    done = out[out.index("== done."):]
    assert "DEMO" in done and "--source auto" in done


def test_install_lets_the_operator_read_the_reports_and_says_so(tmp_path):
    out = dry_run(tmp_path, "--operator", "pi", "--source", "picamera2")
    assert "+ usermod -a -G hematovision pi" in out
    assert "reports: /var/lib/hematovision/reports, readable by pi" in out
    settings = unit_settings()
    assert settings["UMask"] == ["0027"] and settings["StateDirectoryMode"] == ["0750"]


def test_install_puts_the_commands_on_path(tmp_path):
    out = dry_run(tmp_path, "--source", "picamera2")
    for command in ("hematovision-edge", "hematovision-calibrate"):
        assert f"/venv/bin/{command} /usr/local/bin/{command}" in out


def test_install_dry_run_with_usb_gadget_sets_up_dwc2_and_g_serial(tmp_path):
    out = dry_run(tmp_path, "--usb-gadget", "--no-enable", "--source", "picamera2")
    assert "dtoverlay=dwc2" in out and "write /etc/modules-load.d/hematovision-gadget.conf" in out
    assert "g_serial" in out and "/dev/ttyGS0" in out and "systemctl enable" not in out.split("not enabled")[0]


def test_install_script_refuses_unknown_options():
    result = subprocess.run(["bash", str(INSTALL), "--dry-run", "--frobnicate"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown option --frobnicate" in result.stderr
