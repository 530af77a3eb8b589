"""Issue 7 end to end: a replayed specimen's report reaches an ASTM receiver on a pty and a USB drive, once."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from hematovision.edge.links import astm
from hematovision.edge.counting.checks import FULL_REVIEW_BANNER
from hematovision.edge.links.astm import AstmReceiver, parse_message
from hematovision.edge.service.daemon import STATE_FILE, run_main
from hematovision.edge.service.state import Store
from test_astm import Faults, PtyHost
from test_daemon import write_config

FIELDS = 4  # sample fields replayed; the end of the replay finishes the specimen
REPLY_TIMEOUT_S = 1.0  # a silent receiver costs this much, a live pty answers in milliseconds


# --- helpers -----------------------------------------------------------------------------

@pytest.fixture
def frames(tmp_path, samples_bccd) -> Path:
    """A short replay: the first FIELDS sample fields."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for path in sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))[:FIELDS]:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture
def astm_log(caplog):
    caplog.set_level(logging.INFO, logger="hematovision.edge.links.astm_link")
    return caplog


def astm_sends(caplog) -> list[tuple]:
    """(specimen id, frames, retries) of each report the ASTM link delivered, as it logged them."""
    return [r.args[:3] for r in caplog.records
            if r.name == "hematovision.edge.links.astm_link" and r.msg.startswith("sent report")]


def outbox(state: Path) -> list:
    """Every outbox entry with its delivery flags: (specimen id, report, files, link, attempts)."""
    with Store(state / STATE_FILE) as store:
        rows = store.db.execute("SELECT s.specimen_id, o.report, o.files_written, o.link_sent, o.attempts "
                                "FROM outbox o JOIN specimens s ON s.id = o.specimen ORDER BY o.id").fetchall()
    return [(sid, json.loads(report), bool(files), bool(link), attempts)
            for sid, report, files, link, attempts in rows]


def last_error(state: Path) -> str:
    with Store(state / STATE_FILE) as store:
        return store.db.execute("SELECT last_error FROM outbox").fetchone()[0] or ""


def plug(port: Path, host: PtyHost) -> None:
    """Point the configured port (a stable name, as /dev/serial/by-id) at this receiver's pty."""
    port.unlink(missing_ok=True)
    port.symlink_to(host.path)


def assert_records_equal_report(records: list[str], report: dict) -> None:
    got = parse_message(records)
    assert got.specimen_id == report["specimen_id"] == got.patient_ids[0]
    for c in report["classes"]:
        assert got.results[astm.DEFAULT_PERCENT_CODES[c["name"]]].value == f"{c['percent']:.1f}"
    assert got.results["UNIDCNT"].value == str(report["unidentified"])
    assert got.results["CELLCNT"].value == str(report["total"])
    assert report["total"] == sum(c["count"] for c in report["classes"]) + report["unidentified"] > 0
    assert len(got.results) == len(report["classes"]) + 2
    banner = [("needs_full_review", FULL_REVIEW_BANNER)] if report["needs_full_review"] else []
    assert got.comments == tuple(banner + [(f["code"], f["message"]) for f in report["flags"]])


def astm_config(tmp_path, tiny_bundle, frames) -> tuple[Path, Path]:
    port = tmp_path / "ttyLIS"
    config = write_config(tmp_path, tiny_bundle, frames,
                          report={"link": "astm", "port": str(port), "retry_s": 0.1,
                                  "reply_timeout_s": REPLY_TIMEOUT_S})
    return config, port


# --- ASTM over a pseudo-terminal ---------------------------------------------------------

def test_counted_specimen_reaches_the_astm_receiver_once_and_a_second_run_sends_nothing(
        tmp_path, tiny_bundle, frames, astm_log):
    config, port = astm_config(tmp_path, tiny_bundle, frames)
    with PtyHost() as host:
        plug(port, host)
        assert run_main(config) == 0
        assert run_main(config) == 0  # replay at its end, report delivered: nothing to do
    (specimen_id, report, files, link, attempts), = outbox(tmp_path / "state")
    assert (specimen_id, files, link, attempts) == ("S-1", True, True, 0)
    assert len(host.receiver.messages) == 1 and host.receiver.duplicates == 0
    assert_records_equal_report(host.receiver.messages[0], report)
    (sent_id, frames_sent, retries), = astm_sends(astm_log)
    assert (sent_id, retries) == ("S-1", 0)
    assert frames_sent == host.frames_seen == len(host.receiver.messages[0])
    print(f"\nASTM clean: {len(host.receiver.messages)} message over 2 runs, {frames_sent} frames, {retries} "
          f"retries, {len(host.receiver.messages) - 1} duplicate messages kept")


def test_report_survives_a_silent_receiver_and_a_pulled_cable_then_arrives_exactly_once(
        tmp_path, tiny_bundle, frames, astm_log):
    config, port = astm_config(tmp_path, tiny_bundle, frames)
    receiver = AstmReceiver()  # the lab computer stays the same; only the line to it changes
    with PtyHost(receiver, Faults(silent=True)) as host:
        plug(port, host)
        assert run_main(config) == 0  # counts, finishes, cannot deliver
    (_, _, _, link, attempts), = outbox(tmp_path / "state")
    assert (link, attempts) == (False, 1) and "no receiver answered ENQ" in last_error(tmp_path / "state")
    with PtyHost(receiver, Faults(unplug_at_frame=3)) as host:
        plug(port, host)
        assert run_main(config) == 0  # restarted: tries again, the cable is pulled mid-message
    assert host.frames_seen == 3
    (_, _, _, link, attempts), = outbox(tmp_path / "state")
    assert (link, attempts) == (False, 2) and receiver.messages == []
    assert "disconnected" in last_error(tmp_path / "state")
    receiver.expire()  # its receive timer runs out on the dead line: the partial message is dropped
    with PtyHost(receiver, Faults(nak_frames={2}, drop_ack_frames={4})) as host:
        plug(port, host)
        assert run_main(config) == 0  # restarted with a working (if noisy) line: delivered
        assert run_main(config) == 0  # and never again
    (_, report, _, link, attempts), = outbox(tmp_path / "state")
    assert (link, attempts) == (True, 2)
    assert len(receiver.messages) == 1  # the frame repeated after the lost ACK was dropped, not kept
    assert_records_equal_report(receiver.messages[0], report)
    (_, frames_sent, retries), = astm_sends(astm_log)
    assert (retries, receiver.duplicates) == (2, 1)
    assert frames_sent == len(receiver.messages[0]) + retries
    print(f"\nASTM faults: 2 failed tries (silent receiver, cable pulled at frame 3), then on a line with one "
          f"NAK and one lost ACK: {len(receiver.messages)} message, {frames_sent} frames, {retries} retries, "
          f"{receiver.duplicates} repeated frame dropped, {len(receiver.messages) - 1} duplicate messages kept")


# --- the USB drive -----------------------------------------------------------------------

@contextlib.contextmanager
def usb_drive(folder: Path):
    """A tmpfs mounted on `folder`, standing in for the USB drive; skips where mounting is not permitted."""
    try:
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                                capture_output=True, text=True)
    except OSError as err:
        pytest.skip(f"cannot run mount for the stand-in USB drive: {err}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs as the USB drive (needs root): {result.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def files_on(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def fill(folder: Path) -> Path:
    """Fill the drive to its last byte."""
    filler = folder / "filler.bin"
    with open(filler, "wb") as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 2**20)
            out.flush()
    return filler


def test_report_files_reach_the_usb_drive_once_after_it_is_plugged_in_and_has_room(tmp_path, tiny_bundle, frames):
    drive = (tmp_path / "usb").resolve()  # as /proc/mounts names it
    drive.mkdir()
    config = write_config(tmp_path, tiny_bundle, frames,
                          report={"link": "usb", "usb_mount_point": str(drive), "retry_s": 0.1})
    assert run_main(config) == 0  # no drive mounted there yet
    (_, _, files, link, attempts), = outbox(tmp_path / "state")
    assert (files, link, attempts) == (True, False, 1) and "no drive is mounted" in last_error(tmp_path / "state")
    assert files_on(drive) == {}  # nothing written into the bare mount point
    with usb_drive(drive):
        filler = fill(drive)
        assert run_main(config) == 0  # the drive is full
        (_, _, _, link, attempts), = outbox(tmp_path / "state")
        assert (link, attempts) == (False, 2) and "check free space" in last_error(tmp_path / "state")
        assert list(files_on(drive)) == ["filler.bin"]  # no report file, no temporary left behind
        filler.unlink()
        assert run_main(config) == 0
        written = files_on(drive)
        assert sorted(written) == ["hematovision/S-1.csv", "hematovision/S-1.html", "hematovision/S-1.json"]
        (_, report, _, link, attempts), = outbox(tmp_path / "state")
        assert (link, attempts) == (True, 2)
        assert json.loads((drive / "hematovision" / "S-1.json").read_text()) == report
        assert run_main(config) == 0
        assert files_on(drive) == written  # the second run wrote nothing
    print(f"\nUSB: 2 failed tries (no drive, drive full), then {len(written)} files written once")
