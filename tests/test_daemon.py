"""The daemon: replay counting, crash safety under kill -9, faults, commands, sources."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import hematovision.edge.service.daemon as daemon_module
from conftest import DAEMON_COMMAND, NotifyListener, stop_sessions_after, toml_text
from hematovision.edge.config import load_config
from hematovision.edge.service.daemon import STATE_FILE, Daemon, open_pipeline, run_main, serve
from hematovision.edge.reports.report import Report
from hematovision.edge.capture.sources import FolderReplay, VideoReplay, open_source, source_key
from hematovision.edge.service.state import SCHEMA_VERSION, FrameRecord, NewCell, Store, StorageFull
from hematovision.errors import CameraUnavailable

KILLS = 20
COPIES = 3  # the replayed scan: the 34 sample fields three times over (102 frames)
KILL_FPS = 40.0  # paced, so that a kill lands every few frames on a fast machine too


# --- helpers -----------------------------------------------------------------------------

def write_config(folder: Path, bundle: Path, frames: Path, **tables) -> Path:
    sections = {
        "model": {"bundle": str(bundle), "threads": 1},
        "source": {"kind": "replay", "retry_initial_s": 0.05, "retry_max_s": 0.2},
        "source.replay": {"path": str(frames), "fps": 1000.0},
        "specimen": {"id": "S-1", "target": 100000},
        "state": {"directory": str(folder / "state"), "min_free_mb": 1},
    }
    for name, table in tables.items():
        sections[name.replace("__", ".")] = {**sections.get(name.replace("__", "."), {}), **table}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(toml_text(sections))
    return path


def snapshot(state_dir: Path) -> dict:
    """Everything counted, as stored: cells in order, specimen statistics, the report."""
    db = sqlite3.connect(state_dir / STATE_FILE)
    try:
        cells = db.execute("SELECT s.specimen_id, frame, seq, x_um, y_um, label, confidence, bbox, thumbnail "
                           "FROM cells JOIN specimens s ON s.id = cells.specimen ORDER BY cells.id").fetchall()
        specimens = db.execute("SELECT specimen_id, status, finish_reason, fields, skipped_blur, skipped_motion, "
                               "unusable, edge_cells FROM specimens ORDER BY id").fetchall()
        reports = [Report.from_dict(json.loads(r[0])).to_dict()
                   for r in db.execute("SELECT report FROM outbox ORDER BY id")]
    finally:
        db.close()
    for report in reports:
        for key in ("started_at", "finished_at"):
            report.pop(key)
    return {"cells": cells, "specimens": specimens, "reports": reports}


def position(state_dir: Path) -> int:
    if not (state_dir / STATE_FILE).exists():
        return 0
    db = sqlite3.connect(state_dir / STATE_FILE)
    try:
        row = db.execute("SELECT position FROM source_positions").fetchone()
    except sqlite3.OperationalError:
        row = None
    finally:
        db.close()
    return row[0] if row else 0


def spawn(config: Path, log: Path, notify: NotifyListener | None = None) -> subprocess.Popen:
    env = {**os.environ, "WATCHDOG_USEC": "5000000"}
    env.pop("WATCHDOG_PID", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *DAEMON_COMMAND, str(config)], stdout=out, stderr=out, env=env,
                                cwd=config.parent)


class RecordingNotifier:
    """A Notifier for in-process runs: records statuses; waits return at once (or stop the loop)."""

    def __init__(self, stop: threading.Event, stop_on_wait: bool = False):
        self.stop, self.stop_on_wait = stop, stop_on_wait
        self.statuses: list[str] = []
        self.waits: list[float] = []

    def ready(self, status):
        self.statuses.append("READY " + status)

    def status(self, text):
        self.statuses.append(text)

    def stopping(self, status="stopping"):
        self.statuses.append("STOPPING " + status)

    def watchdog(self):
        pass

    def wait(self, stop, seconds):
        self.waits.append(seconds)
        if self.stop_on_wait:
            stop.set()
        return stop.is_set()


def run_daemon(config: Path, notifier=None, link=None, stop_on_wait=False, **daemon_attrs) -> Daemon:
    cfg = load_config(config)
    stop = threading.Event()
    notifier = notifier or RecordingNotifier(stop, stop_on_wait)
    with Store(cfg.state_dir() / STATE_FILE, cfg.state.min_free_mb * 2**20) as store:
        daemon = Daemon(cfg, open_pipeline(cfg), store, notifier, stop, link)
        for k, v in daemon_attrs.items():
            setattr(daemon, k, v)
        assert daemon.run() == 0
    return daemon


@pytest.fixture(scope="module")
def scan_frames(tmp_path_factory, samples_bccd) -> Path:
    """A replayed scan: links to the sample fields, COPIES times over, in name order."""
    folder = tmp_path_factory.mktemp("scan")
    fields = sorted((samples_bccd / "BCCD" / "JPEGImages").glob("*.jpg"))
    for copy in range(COPIES):
        for i, path in enumerate(fields):
            (folder / f"{copy}-{i:03d}.jpg").symlink_to(path)
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bundle, scan_frames) -> dict:
    """The uninterrupted run of the scan."""
    folder = tmp_path_factory.mktemp("reference")
    assert serve(load_config(write_config(folder, tiny_bundle, scan_frames)), threading.Event()) == 0
    return snapshot(folder / "state")


# --- counting a replay -------------------------------------------------------------------

def test_replay_counts_every_frame_and_files_a_valid_report(reference, tmp_path, tiny_bundle, scan_frames):
    frames = len(list(scan_frames.iterdir()))
    (specimen_id, status, reason, fields, *_), = reference["specimens"]
    assert (specimen_id, status, reason, fields) == ("S-1", "finished", "end of replay", frames)
    report = reference["reports"][0]
    assert report["total"] == len(reference["cells"]) > 0
    assert report["frames"]["used"] == frames and "target_not_reached" in report["quality_flags"]
    assert len({(c[1], c[2]) for c in reference["cells"]}) == len(reference["cells"])


def test_run_main_writes_report_files_and_a_second_run_counts_nothing_again(tmp_path, tiny_bundle, samples_bccd):
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages", report={"folder": "out"})
    assert run_main(config) == 0
    first = snapshot(tmp_path / "state")
    assert sorted(p.suffix for p in (tmp_path / "state" / "out").iterdir()) == [".csv", ".html", ".json"]
    assert run_main(config) == 0  # the replay is at its end: nothing new
    assert snapshot(tmp_path / "state") == first


def test_target_reached_finishes_the_specimen_with_its_report(tmp_path, tiny_bundle, scan_frames):
    config = write_config(tmp_path, tiny_bundle, scan_frames, specimen={"target": 3})
    run_daemon(config)
    snap = snapshot(tmp_path / "state")
    (_, status, reason, *_), = snap["specimens"]
    assert (status, reason) == ("finished", "target reached")
    report = snap["reports"][0]
    assert report["target_reached"] and sum(c["count"] for c in report["classes"]) == 3


def test_kill_9_at_random_points_resumes_with_exactly_the_cells_of_an_uninterrupted_run(
        tmp_path, tiny_bundle, scan_frames, reference, notify_listener):
    rng = random.Random(20261128)
    config = write_config(tmp_path, tiny_bundle, scan_frames, source__replay={"fps": KILL_FPS})
    state, log = tmp_path / "state", tmp_path / "daemon.log"
    frames = len(list(scan_frames.iterdir()))
    kills, mid_scan, positions = 0, 0, []
    while kills < KILLS:
        notify_listener.drain()
        proc = spawn(config, log, notify_listener)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.8))  # during start-up, model loading, resuming
        else:
            notify_listener.wait_for("READY", 30, proc.pid)
            time.sleep(rng.uniform(0.0, 0.12))  # in the frame loop: mid-frame, mid-commit
        if proc.poll() is not None:
            break  # finished before this kill came
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        positions.append(position(state))
        mid_scan += 0 < positions[-1] < frames
    final = spawn(config, log)
    assert final.wait(60) == 0, log.read_text()[-3000:]
    print(f"\nkill -9: {kills} kills, {mid_scan} in mid-scan, positions {positions}")
    assert kills >= 15 and mid_scan >= 10, positions
    assert snapshot(state) == reference


def test_sigterm_and_sigint_finish_the_frame_exit_0_and_resume(tmp_path, tiny_bundle, scan_frames, reference,
                                                              notify_listener):
    config = write_config(tmp_path, tiny_bundle, scan_frames, source__replay={"fps": 20.0})
    log = tmp_path / "daemon.log"
    for signum in (signal.SIGTERM, signal.SIGINT):
        proc = spawn(config, log, notify_listener)
        notify_listener.wait_for("READY", 30, proc.pid)
        time.sleep(0.3)
        proc.send_signal(signum)
        assert proc.wait(20) == 0
        assert f"{signum.name} received" in log.read_text()
    assert 0 < position(tmp_path / "state") < len(list(scan_frames.iterdir()))
    config.write_text(config.read_text().replace("fps = 20.0", "fps = 1000.0"))
    assert spawn(config, log).wait(60) == 0
    assert snapshot(tmp_path / "state") == reference


# --- faults ------------------------------------------------------------------------------

def test_camera_that_fails_and_vanishes_is_reopened_with_backoff_keeping_the_specimen(
        tmp_path, tiny_bundle, scan_frames, reference, monkeypatch):
    openings = {"n": 0}

    class Flaky:
        """Delivers a few frames, then stops delivering (a camera pulled out)."""

        def __init__(self, inner):
            self.inner, self.left = inner, 7

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def next_frame(self, stop):
            self.left -= 1
            if self.left < 0:
                raise CameraUnavailable("test camera stopped delivering frames")
            return self.inner.next_frame(stop)

    real_open = open_source

    @contextlib.contextmanager
    def flaky_open(config, position, profile=None):
        openings["n"] += 1
        if openings["n"] % 3 == 2:
            raise CameraUnavailable("test camera cannot be opened")
        with real_open(config, position, profile) as source:
            yield Flaky(source) if openings["n"] < 12 else source

    monkeypatch.setattr(daemon_module, "open_source", flaky_open)
    daemon = run_daemon(write_config(tmp_path, tiny_bundle, scan_frames))
    assert snapshot(tmp_path / "state") == reference
    assert any("camera unavailable" in s for s in daemon.notifier.statuses)
    # a failed opening doubles the wait; one that works resets it
    assert daemon.notifier.waits[:6] == [0.05, 0.1, 0.05, 0.05, 0.1, 0.05]


def test_backoff_doubles_up_to_its_maximum():
    from hematovision.edge.service.daemon import Backoff

    backoff = Backoff(1.0, 5.0)
    assert [backoff.next() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.next() == 1.0


def test_full_database_rolls_back_the_whole_frame_and_keeps_the_file_sound(tmp_path):
    with Store(tmp_path / STATE_FILE, max_page_count=40) as store:
        specimen = store.start_specimen("S-full", 100)
        big = NewCell(1.0, 2.0, "neutrophil", 0.9, (0, 0, 10, 10), os.urandom(20_000))
        frames = 0
        with pytest.raises(StorageFull, match="full"):
            for frames in range(100):
                store.record_frame(FrameRecord(specimen, "test", frames, "used", (big, big), 0, {"n": frames}))
        kept = store.label_counts(specimen)
        assert kept == {"neutrophil": 2 * frames}  # the frame that did not fit left no cell
        assert store.position("test") == frames
        assert store.open_specimen().tracker_state == {"n": frames - 1}
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_disk_below_the_free_space_limit_stops_counting_with_a_clear_status(tmp_path, tiny_bundle, scan_frames):
    config = write_config(tmp_path, tiny_bundle, scan_frames, state={"min_free_mb": 1_000_000})
    daemon = run_daemon(config, stop_on_wait=True)
    assert any(s.startswith("STOPPED: disk full") for s in daemon.notifier.statuses)
    assert snapshot(tmp_path / "state")["cells"] == []


def test_undelivered_report_stays_in_the_outbox_and_is_sent_on_the_next_try(tmp_path, tiny_bundle, samples_bccd):
    from hematovision.errors import LinkFailed

    class Link:
        def __init__(self, fail):
            self.fail, self.sent = fail, []

        def send(self, report):
            if self.fail:
                raise LinkFailed("receiver is off")
            self.sent.append(report.specimen_id)
            return type("R", (), {"link": "test"})()

    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages")
    run_daemon(config, link=Link(fail=True))
    with Store(tmp_path / "state" / STATE_FILE) as store:
        (entry,) = store.pending_reports(False, True)
        assert entry.attempts == 1 and entry.files_written
    link = Link(fail=False)
    run_daemon(config, link=link)
    assert link.sent == ["S-1"]


# --- commands ----------------------------------------------------------------------------

def test_finish_and_start_commands_drive_the_specimen_workflow(tmp_path, tiny_bundle, scan_frames, monkeypatch):
    config = write_config(tmp_path, tiny_bundle, scan_frames, specimen={"auto_start": False})
    state = tmp_path / "state" / STATE_FILE
    with Store(state) as store:
        store.add_command("start", "A", 500)
        store.add_command("start", "B", 500)
    real_open, commands = open_source, Store(state)

    @contextlib.contextmanager
    def finishing_after_five(config, position, profile=None):
        with real_open(config, position, profile) as source:
            inner = source.next_frame

            def next_frame(stop):
                if source.position == 5:
                    commands.add_command("finish")
                return inner(stop)

            source.next_frame = next_frame
            yield source

    monkeypatch.setattr(daemon_module, "open_source", finishing_after_five)
    with commands:
        run_daemon(config)
    with Store(state) as store:
        a = store.specimen("A")  # the command came while frame 5 was read: taken before frame 6
        assert (a.status, a.finish_reason, a.fields) == ("finished", "finished by command", 6)
        results = [r[0] for r in store.db.execute("SELECT result FROM commands ORDER BY id")]
    assert results == ["started A", "refused: specimen A is open; finish it first", "finished"]


# --- sources -----------------------------------------------------------------------------

def test_folder_replay_resumes_at_its_position_loops_and_paces(samples_bccd):
    folder = samples_bccd / "BCCD" / "JPEGImages"
    names = sorted(p.name for p in folder.glob("*.jpg"))
    stop = threading.Event()
    replay = FolderReplay(folder, 1000.0, loop=False, position=32)
    assert [replay.next_frame(stop).name for _ in range(2)] == names[32:34]
    assert replay.next_frame(stop) is None
    looped = FolderReplay(folder, 1000.0, loop=True, position=33)
    assert [(f.index, f.name) for f in (looped.next_frame(stop), looped.next_frame(stop))] == \
        [(33, names[33]), (34, names[0])]
    paced, started = FolderReplay(folder, 20.0, loop=False, position=0), time.monotonic()
    for _ in range(5):
        paced.next_frame(stop)
    assert time.monotonic() - started >= 4 / 20 * 0.9
    stop.set()
    assert paced.next_frame(stop) is None


def test_video_replay_resumes_at_the_same_frame(tmp_path):
    path = tmp_path / "scan.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(8):
        writer.write(np.full((48, 64, 3), (i * 30, 255 - i * 30, 100), np.uint8))
    writer.release()
    stop = threading.Event()
    whole = VideoReplay(path, 1000.0, False, 0)
    frames = [whole.next_frame(stop) for _ in range(8)]
    assert whole.next_frame(stop) is None
    whole.close()
    resumed = VideoReplay(path, 1000.0, False, 5)
    frame = resumed.next_frame(stop)
    resumed.close()
    assert frame.index == 5 and np.array_equal(frame.image, frames[5].image)


def test_missing_cameras_raise_camera_unavailable_saying_what_to_check(tmp_path, tiny_bundle, samples_bccd):
    from hematovision.edge.config import OpenCVConfig, Picamera2Config
    from hematovision.edge.capture.sources import OpenCVSource, Picamera2Source

    with pytest.raises(CameraUnavailable, match="cannot be opened"):
        OpenCVSource(OpenCVConfig(device=str(tmp_path / "video99")), 0)
    try:
        import picamera2  # noqa: F401
    except ImportError:
        with pytest.raises(CameraUnavailable, match="apt install python3-picamera2"):
            Picamera2Source(Picamera2Config(), 0)


@pytest.mark.hardware
def test_picamera2_source_delivers_rgb_frames_on_the_pi():
    if not os.environ.get("HEMATOVISION_HARDWARE"):
        pytest.skip("needs a Raspberry Pi camera: set HEMATOVISION_HARDWARE=1 on the Pi")
    from hematovision.edge.config import Picamera2Config
    from hematovision.edge.capture.sources import Picamera2Source

    source = Picamera2Source(Picamera2Config(width=1014, height=760), 0)
    try:
        frame = source.next_frame(threading.Event())
    finally:
        source.close()
    assert frame.image.shape == (760, 1014, 3) and frame.image.dtype == np.uint8


@pytest.mark.hardware
def test_opencv_source_delivers_frames_from_a_usb_camera():
    if not os.environ.get("HEMATOVISION_HARDWARE"):
        pytest.skip("needs a USB camera at /dev/video0: set HEMATOVISION_HARDWARE=1")
    from hematovision.edge.config import OpenCVConfig
    from hematovision.edge.capture.sources import OpenCVSource

    source = OpenCVSource(OpenCVConfig(), 0)
    try:
        frame = source.next_frame(threading.Event())
    finally:
        source.close()
    assert frame.image.ndim == 3 and frame.index == 0


# --- scan mode: overlapping frames through the count-once tracker ----------------------------

@pytest.fixture(scope="module")
def simulated_scan(tmp_path_factory, samples_bccd) -> Path:
    from hematovision.edge.counting.scansim import ScanSettings, build_slide, field_paths, scan, write_scan

    settings = ScanSettings(columns=2, rows=2, detours=1, seed=3)
    slide = build_slide(field_paths(samples_bccd, 4), settings)
    folder = write_scan(scan(slide, settings), tmp_path_factory.mktemp("simscan"), slide, ".jpg")
    (folder / "truth.json").unlink()
    return folder


def test_scan_mode_stopped_and_resumed_counts_what_an_uninterrupted_scan_counts(
        tmp_path, tiny_bundle, simulated_scan, monkeypatch):
    whole = write_config(tmp_path / "whole", tiny_bundle, simulated_scan, counting={"mode": "scan"})
    run_daemon(whole)
    expected = snapshot(tmp_path / "whole" / "state")
    assert expected["cells"] and expected["specimens"][0][3] > 0

    resumed = write_config(tmp_path / "resumed", tiny_bundle, simulated_scan, counting={"mode": "scan"})
    real_open = open_source

    @contextlib.contextmanager
    def stopping_every_seven(config, position, profile=None):
        with real_open(config, position, profile) as source:
            inner, started = source.next_frame, source.position

            def next_frame(stop):
                if source.position - started == 7:
                    stop.set()  # as SIGTERM: this session ends, the next run resumes
                return inner(stop)

            source.next_frame = next_frame
            yield source

    monkeypatch.setattr(daemon_module, "open_source", stopping_every_seven)
    for _ in range(100):
        run_daemon(resumed)
        if snapshot(tmp_path / "resumed" / "state")["specimens"][0][1] == "finished":
            break
    assert snapshot(tmp_path / "resumed" / "state") == expected


# Committed before any restart: one frame of a specimen counted with a bundle that names nucleated red
# cells and platelets (conftest's nrbc_bundle).
BEFORE_RESTART = ["neutrophil", "lymphocyte"] + ["erythroblast"] * 7 + ["platelet"] * 3 + ["unidentified"]
NRBC_TARGET = 6


def nrbc_specimen_config(folder: Path, bundle: Path, frames: Path) -> Path:
    """A configuration whose open specimen has the replay's frame 0 committed with BEFORE_RESTART's cells."""
    config = write_config(folder, bundle, frames, specimen={"auto_start": False, "target": NRBC_TARGET})
    cfg = load_config(config)
    thumbnail = cv2.imencode(".jpg", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()
    cells = tuple(NewCell(10.0 * i, 5.0, label, 0.9, (0, 0, 8, 8), thumbnail)
                  for i, label in enumerate(BEFORE_RESTART))
    with Store(cfg.state_dir() / STATE_FILE) as store:
        specimen = store.start_specimen("S-NRBC", NRBC_TARGET)
        store.record_frame(FrameRecord(specimen, source_key(cfg), 0, "used", cells, 0, None))
    return config


def test_nrbc_and_rejected_counts_survive_restarts_and_stay_out_of_the_target(
        tmp_path, nrbc_bundle, samples_bccd, monkeypatch):
    frames = samples_bccd / "BCCD" / "JPEGImages"
    daemon = run_daemon(nrbc_specimen_config(tmp_path / "whole", nrbc_bundle, frames))
    assert daemon.notifier.statuses[0] == "READY specimen S-NRBC: 2/6 cells, 1 unidentified, 7 NRBC, 3 rejected"
    expected = snapshot(tmp_path / "whole" / "state")
    (_, status, reason, *_), = expected["specimens"]
    assert (status, reason) == ("finished", "target reached")
    labels = [c[5] for c in expected["cells"]]
    last_frame = [c[5] for c in expected["cells"] if c[1] == expected["cells"][-1][1]]
    wbc = labels.count("neutrophil") + labels.count("lymphocyte")
    assert wbc - last_frame.count("neutrophil") - last_frame.count("lymphocyte") < NRBC_TARGET <= wbc
    report = expected["reports"][0]
    assert sum(c["count"] for c in report["classes"]) == wbc and report["target_reached"]
    assert report["nrbc"] == {"count": labels.count("erythroblast"),
                              "per_100_wbc": round(100 * labels.count("erythroblast") / wbc, 2)}
    assert labels.count("erythroblast") >= 7 and labels.count("platelet") >= 3
    assert report["rejected"] == [{"name": "platelet", "count": labels.count("platelet")}]
    assert report["total"] == len(labels) == len(report["cells"])

    resumed = nrbc_specimen_config(tmp_path / "resumed", nrbc_bundle, frames)
    real_open = open_source

    @contextlib.contextmanager
    def stopping_every_three(config, position, profile=None):
        with real_open(config, position, profile) as source:
            inner, started = source.next_frame, source.position

            def next_frame(stop):
                if source.position - started == 3:
                    stop.set()  # as SIGTERM: this session ends, the next run resumes
                return inner(stop)

            source.next_frame = next_frame
            yield source

    monkeypatch.setattr(daemon_module, "open_source", stopping_every_three)
    for _ in range(30):
        run_daemon(resumed)
        if snapshot(tmp_path / "resumed" / "state")["specimens"][0][1] == "finished":
            break
    assert snapshot(tmp_path / "resumed" / "state") == expected


@pytest.mark.parametrize("seed, every", [(5, 7), (11, 7), (11, 3)])
def test_scan_positions_survive_restarts_exactly(tmp_path, tiny_bundle, samples_bccd, monkeypatch, seed, every):
    """Scans with jumps away and back: a restart must keep the keyframes a jump is relocalised
    against, and which frame the last sharp one was, or cells land tens of micrometres off."""
    from hematovision.edge.counting.scansim import ScanSettings, build_slide, field_paths, scan, write_scan

    settings = ScanSettings(columns=3, rows=2, detours=3, seed=seed)
    slide = build_slide(field_paths(samples_bccd, 6), settings)
    frames = write_scan(scan(slide, settings), tmp_path / "frames", slide, ".jpg")
    (frames / "truth.json").unlink()
    whole = write_config(tmp_path / "whole", tiny_bundle, frames, counting={"mode": "scan"})
    run_daemon(whole)
    expected = snapshot(tmp_path / "whole" / "state")

    resumed = write_config(tmp_path / "resumed", tiny_bundle, frames, counting={"mode": "scan"})
    stop_sessions_after(monkeypatch, every)
    for restarts in range(1, 100):
        run_daemon(resumed)
        if snapshot(tmp_path / "resumed" / "state")["specimens"][0][1] == "finished":
            break
    got = snapshot(tmp_path / "resumed" / "state")
    assert [c[3:5] for c in got["cells"]] == [c[3:5] for c in expected["cells"]]  # positions, to the last bit
    assert got == expected and restarts > 5


def test_delivered_specimens_are_pruned_past_their_age_or_the_size_limit_and_nothing_else(tmp_path):
    from hematovision.edge.service.state import PruneSettings

    with Store(tmp_path / STATE_FILE) as store:
        thumb = os.urandom(30_000)
        for name in ("old", "new", "undelivered", "open"):
            specimen = store.start_specimen(name, 100)
            cells = tuple(NewCell(1.0, 2.0, "neutrophil", 0.9, (0, 0, 10, 10), thumb) for _ in range(4))
            store.record_frame(FrameRecord(specimen, "test", 0, "used", cells, 0, None))
            if name != "open":
                store.finish_specimen(specimen, "test", {"specimen_id": name})
        for entry in store.pending_reports(True, True):
            if entry.specimen_id != "undelivered":
                store.mark_report(entry, files=True, link=True)
        store.db.execute("UPDATE specimens SET finished_at = '2020-01-01T00:00:00+00:00' WHERE specimen_id = 'old'")

        def kept():
            return {sid for (sid,) in store.db.execute(
                "SELECT DISTINCT s.specimen_id FROM cells JOIN specimens s ON s.id = cells.specimen")}

        assert store.prune(PruneSettings(keep_days=90, max_mb=1000), files=True, link=True) == 1
        assert kept() == {"new", "undelivered", "open"} and store.report("old") is None
        assert store.prune(PruneSettings(keep_days=90, max_mb=0.1), files=True, link=True) == 1  # the size limit
        assert kept() == {"undelivered", "open"}
        assert store.specimen_ids() == ["old", "new", "undelivered", "open"]  # ids stay taken


def test_the_database_stops_growing_once_delivered_specimens_are_pruned(tmp_path, tiny_bundle, samples_bccd):
    frames = samples_bccd / "BCCD" / "JPEGImages"
    config = write_config(tmp_path, tiny_bundle, frames, specimen={"id": "", "target": 2},
                          state={"keep_days": 0.0}, report={"folder": "out"})
    run_daemon(config)
    with Store(tmp_path / "state" / STATE_FILE) as store:
        finished = store.db.execute("SELECT COUNT(*) FROM specimens WHERE status = 'finished'").fetchone()[0]
        left = store.db.execute("SELECT COUNT(DISTINCT specimen) FROM cells").fetchone()[0]
        reports = store.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    assert finished >= 5 and left <= 2 and reports <= 1  # what is delivered is gone; files are on disk
    assert len(list((tmp_path / "state" / "out").glob("*.json"))) == finished


def test_temporary_files_a_cut_write_left_are_removed_at_start_and_before_a_usb_write(
        tmp_path, tiny_bundle, samples_bccd):
    from hematovision.edge.links.usb import UsbSettings, write_report_to_usb
    from hematovision.edge.reports.report import commissioning_report

    reports = tmp_path / "state" / "out"
    reports.mkdir(parents=True)
    orphan = reports / ".S-0.json.0123456789ab.tmp"
    orphan.write_bytes(b"half a report")
    keep = reports / ".notes.tmp"  # not a name the writer makes: left alone
    keep.write_text("mine")
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages", report={"folder": "out"})
    run_daemon(config)
    assert not orphan.exists() and keep.exists()

    drive = tmp_path / "media" / "usb"
    (drive / "hematovision").mkdir(parents=True)
    cut = drive / "hematovision" / ".S-7.html.abcdefabcdef.tmp"
    cut.write_bytes(b"<html>")
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 {drive} vfat rw,relatime 0 0\n")
    written = write_report_to_usb(commissioning_report("S-7"), UsbSettings(mounts_file=mounts,
                                                                           media_roots=(tmp_path / "media",)))
    assert not cut.exists() and sorted(p.name for p in (drive / "hematovision").iterdir()) == \
        sorted(p.name for p in written)


# --- the white count and the fields' names ---------------------------------------------------

def test_specimen_started_with_a_white_count_reports_absolute_counts_and_each_cells_field(
        tmp_path, tiny_bundle, samples_bccd):
    from hematovision.edge.service.daemon import command_main

    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages",
                          specimen={"auto_start": False})
    assert command_main(config, "start", "S-W", 100000, 7.5) == 0
    run_daemon(config)
    with Store(tmp_path / "state" / STATE_FILE) as store:
        report = store.report("S-W")
    assert report["wbc_10e9_per_l"] == 7.5
    first = Report.from_dict(report).classes[0]
    assert Report.from_dict(report).absolute(first) == pytest.approx(7.5 * first.percent / 100)
    names = {p.name for p in (samples_bccd / "BCCD" / "JPEGImages").iterdir()}
    assert report["cells"] and all(c["field"] in names for c in report["cells"])


def test_edge_cli_specimen_start_takes_the_white_count(tmp_path, tiny_bundle, samples_bccd):
    from hematovision.edge.cli import main as edge_main

    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages")
    assert edge_main(["specimen", "start", "--id", "S-9", "--wbc", "6.2", "--config", str(config)]) == 0
    with Store(tmp_path / "state" / STATE_FILE) as store:
        (command,) = store.pending_commands()
    assert (command.specimen_id, command.wbc_10e9_per_l) == ("S-9", 6.2)


def test_a_version_1_state_database_gains_the_new_columns_and_keeps_its_specimens(tmp_path):
    path = tmp_path / STATE_FILE
    with Store(path) as store:
        store.start_specimen("OLD", 100)
    db = sqlite3.connect(path)  # back to version 1: as a database made before this version
    for table, column in (("specimens", "wbc"), ("cells", "field"), ("commands", "wbc")):
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.execute("PRAGMA user_version = 1")
    db.commit()
    db.close()
    with Store(path) as store:
        old = store.open_specimen()
        assert (old.specimen_id, old.wbc_10e9_per_l, old.tracker_state) == ("OLD", None, None)
        store.record_frame(FrameRecord(old, "test", 0, "used", (NewCell(1.0, 2.0, "neutrophil", 0.9, (0, 0, 4, 4),
                                                                           b"jpeg", "f1.jpg"),), 0, {"n": 1}))
        assert store.cells(old)[0][1].field == "f1.jpg" and store.open_specimen().tracker_state == {"n": 1}
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION  # 3: the flags' evidence, 4: review
