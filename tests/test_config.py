"""The daemon's configuration: one typed TOML file, every key and value checked at start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hematovision.edge.config import Config, describe, load_config
from hematovision.edge.service.daemon import EX_CONFIG, check_config_main
from hematovision.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "config.example.toml"


@pytest.fixture
def fake_bundle(tmp_path, monkeypatch) -> Path:
    """A folder that passes the configuration's bundle check (the model itself is not loaded)."""
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "bundle.json").write_text("{}")
    monkeypatch.setenv("HEMATOVISION_MODEL", str(folder))
    return folder


def write(tmp_path: Path, text: str, frames: str = "frames") -> Path:
    (tmp_path / frames).mkdir(exist_ok=True)
    path = tmp_path / "config.toml"
    path.write_text(f'[source.replay]\npath = "{frames}"\n' + text)
    return path


def test_example_configuration_loads_as_it_is_on_the_committed_samples(fake_bundle):
    config = load_config(EXAMPLE)
    assert config.source.kind == "replay" and config.counting.mode == "fields"
    assert config.resolve(config.source.replay.path) == (REPO / "samples/bccd/BCCD/JPEGImages").resolve()
    assert config.bundle_path() == fake_bundle


def test_example_configuration_names_every_key_with_its_default(fake_bundle):
    text = EXAMPLE.read_text()
    defaults = load_config(EXAMPLE)
    for line in describe():
        dotted = line.split(" = ")[0]
        *tables, key = dotted.split(".")
        assert re.search(rf"^\[{re.escape('.'.join(tables))}\]", text, re.M), dotted
        assert re.search(rf"^{key} = ", text, re.M), f"{dotted} is missing from the example"
    assert defaults.source.opencv == Config().source.opencv


@pytest.mark.parametrize("text, named", [
    ("[source]\nkind = \"webcam\"\n", r"source\.kind = 'webcam' is not allowed; use one of replay, opencv"),
    ("[source.replay]\nfsp = 2\n", r"unknown key source\.replay\.fsp; known keys here: source\.replay\.path"),
    ("[spesimen]\nid = \"A\"\n", r"unknown key spesimen"),
    ("[specimen]\ntarget = \"100\"\n", r"specimen\.target = '100' must be an integer"),
    ("[specimen]\ntarget = 0\n", r"specimen\.target = 0 is out of range; use a value from 1 to 100000"),
    ("[specimen]\nauto_start = 1\n", r"specimen\.auto_start = 1 must be true or false"),
    ("[model]\nthreads = true\n", r"model\.threads = True must be an integer"),
    ("[source]\nretry_initial_s = 5\nretry_max_s = 1\n", r"source\.retry_max_s \(1\.0\) is below"),
    ("[report]\nlink = \"astm\"\n", r"report\.link = 'astm' needs report\.port"),
    ("[calibration]\nprofile = \"missing.json\"\n", r"calibration\.profile 'missing\.json' does not exist"),
    ("[source]\nreplay = 3\n", r"\[source\.replay\] must be a table"),
    ("[state\n", r"not valid TOML"),
])
def test_bad_key_or_value_stops_naming_the_key_and_the_fix(tmp_path, fake_bundle, text, named):
    path = tmp_path / "config.toml"
    (tmp_path / "frames").mkdir()
    path.write_text(text if text.startswith("[source.replay]") or "replay = 3" in text
                    else text + '[source.replay]\npath = "frames"\n')
    with pytest.raises(ConfigError, match=named):
        load_config(path)


def test_replay_path_must_exist_and_is_relative_to_the_file(tmp_path, fake_bundle):
    config = load_config(write(tmp_path, ""))
    assert config.resolve(config.source.replay.path) == tmp_path / "frames"
    (tmp_path / "config.toml").write_text('[source.replay]\npath = "nowhere"\n')
    with pytest.raises(ConfigError, match=r"source\.replay\.path 'nowhere' does not exist"):
        load_config(tmp_path / "config.toml")


def test_missing_bundle_is_a_configuration_error_naming_model_bundle(tmp_path, monkeypatch):
    monkeypatch.setenv("HEMATOVISION_MODEL", str(tmp_path / "no-bundle"))
    with pytest.raises(ConfigError, match=r"model\.bundle: .*no-bundle is not a model bundle"):
        load_config(write(tmp_path, ""))


def test_missing_file_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match="copy systemd/config.example.toml"):
        load_config(tmp_path / "absent.toml")


def test_state_folder_comes_from_systemd_state_directory_when_not_set(tmp_path, fake_bundle, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/hematovision")
    config = load_config(write(tmp_path, ""))
    assert config.state_dir() == Path("/var/lib/hematovision")
    assert config.report_dir() == Path("/var/lib/hematovision/reports")
    config = load_config(write(tmp_path, '[state]\ndirectory = "st"\n[report]\nfolder = ""\n'))
    assert config.state_dir() == tmp_path / "st" and config.report_dir() is None


def test_check_config_exits_0_for_a_good_file_and_78_naming_the_key_for_a_bad_one(
        daemon_config, tmp_path, caplog):
    assert check_config_main(daemon_config()) == 0
    bad = daemon_config(source__replay={"fps": -1.0})
    assert check_config_main(bad) == EX_CONFIG
    assert "source.replay.fps = -1.0 is out of range" in caplog.text


def test_run_refuses_a_bad_configuration_before_touching_state(daemon_config, tmp_path):
    from hematovision.edge.service.daemon import run_main

    assert run_main(daemon_config(counting={"mode": "sweep"})) == EX_CONFIG
    assert not (tmp_path / "state").exists()


# --- timings against the watchdog, and the devices the configuration names --------------------

@pytest.mark.parametrize("tables, named", [
    ({"source__replay": {"fps": 0.01}}, r"source\.replay\.fps gives one frame every 100 s, longer than half"),
    ({"source": {"frame_timeout_s": 3600.0}}, r"source\.frame_timeout_s gives 3600 s, longer than half the "
                                               r"watchdog interval \(30 s"),
    ({"source": {"frame_timeout_s": 8.0}, "service": {"watchdog_s": 10.0}}, r"frame_timeout_s gives 8 s"),
])
def test_a_wait_longer_than_half_the_watchdog_is_refused(daemon_config, tables, named):
    with pytest.raises(ConfigError, match=named):
        load_config(daemon_config(**tables))


def test_run_checks_the_waits_against_the_watchdog_systemd_gives(daemon_config, monkeypatch, caplog):
    from hematovision.edge.service.daemon import run_main

    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert run_main(daemon_config(source__replay={"fps": 1.0})) == EX_CONFIG
    assert "source.replay.fps gives one frame every 1 s, longer than half the watchdog interval (1 s" in caplog.text


def _check(config, caplog) -> tuple[int, str]:
    caplog.clear()
    return check_config_main(config), caplog.text


def test_check_config_refuses_a_camera_or_serial_port_that_does_not_exist(daemon_config, tmp_path, caplog):
    code, log = _check(daemon_config(source={"kind": "opencv"}, source__opencv={"device": str(tmp_path / "video9")}),
                       caplog)
    assert code == EX_CONFIG and "source.opencv.device" in log and "is not a camera device" in log
    code, log = _check(daemon_config(source={"kind": "opencv"}, source__opencv={"device": "97"}), caplog)
    assert code == EX_CONFIG and "/dev/video97 is not a camera device" in log
    code, log = _check(daemon_config(report={"link": "astm", "port": "/dev/ttyS97"}), caplog)
    assert code == EX_CONFIG and "report.port '/dev/ttyS97' is not a serial device" in log
    code, log = _check(daemon_config(report={"link": "jsonl", "port": str(tmp_path / "plain-file")}), caplog)
    assert code == EX_CONFIG


def test_check_config_warns_of_a_usb_serial_adapter_not_plugged_in_yet(daemon_config, caplog):
    code, log = _check(daemon_config(report={"link": "astm", "port": "/dev/ttyUSB97"}), caplog)
    assert code == 0 and "report.port /dev/ttyUSB97: no serial adapter is plugged in there now" in log


def test_check_config_passes_a_serial_port_that_exists(daemon_config, caplog):
    import os
    import tty

    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        code, log = _check(daemon_config(report={"link": "jsonl", "port": os.ttyname(slave)}), caplog)
    finally:
        os.close(master)
        os.close(slave)
    assert code == 0, log


def test_check_config_warns_of_a_usb_drive_not_plugged_in_yet(daemon_config, tmp_path, caplog):
    drive = tmp_path / "usb"
    drive.mkdir()
    code, log = _check(daemon_config(report={"link": "usb", "usb_mount_point": str(drive)}), caplog)
    assert code == 0 and "WARNING" in log and f"{drive}: no drive is mounted there now" in log
