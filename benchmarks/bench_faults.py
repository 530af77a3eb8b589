"""Fault injection: the daemon on a replay while it is killed, its receiver stalls and is unplugged,
and its disk fills; prints cells and reports against an undisturbed run, and the frame rate.

    python benchmarks/bench_faults.py [--model BUNDLE] [--copies 6] [--fps 2] [--target 15]
                                      [--seed 1] [--disk-mb 48] [--json FILE]

Targets: 0 cells lost or counted twice, 0 reports lost, frame rate with the receiver down at least
90% of the rate with it up. The default run takes about three to five minutes.

What it does, all with real processes, files and pseudo-terminals:
  1. Counts the replay (the committed sample fields, --copies times over, as consecutive specimens
     of --target identified cells) once undisturbed: the reference cells.
  2. Counts it again, paced at --fps, with `hematovision-edge run` reporting over JSON lines to a
     receiver on a pseudo-terminal, while on a seeded random timetable it
       - kills the daemon with SIGKILL (and starts it again, as systemd would),
       - switches the receiver between up (acknowledges), stalled (never reads: writes block),
         silent (reads, never answers) and unplugged (the port's name points nowhere),
       - fills the state folder's disk to its last byte for a few seconds.
     The state folder is a tmpfs of --disk-mb mounted for the run (root), or, where mounting is
     not permitted, an ext4 image on a loop device; with neither, the disk is not filled (said).
  3. Plugs the receiver in for good and runs the daemon until its outbox is empty.
Frame rates are taken from the committed source position every quarter second, over intervals in
which the daemon had said READY at least two seconds before, the disk had room and the receiver's
state did not change.
Then it compares every stored cell (specimen order, frame, position, class, confidence) with the
reference, counts acknowledged reports (a report acknowledged twice is a duplicate: delivery is
at least once, and a kill between the acknowledgement and its commit sends it again), and the
frames per second while the daemon was up and the disk had room, by receiver state.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tty
from dataclasses import dataclass, field
from pathlib import Path

from provenance import repo_path, write_result

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples" / "bccd" / "BCCD" / "JPEGImages"
DAEMON = ["-c", "import sys; from hematovision.edge.service.daemon import run_main; sys.exit(run_main(sys.argv[1]))"]
RECEIVER_STATES = ("up", "stalled", "silent", "unplugged")
DOWN = ("stalled", "silent", "unplugged")
WARM_UP_S = 2.0  # after READY, the first frames of a restarted daemon are not timed (interpreter warm-up)


# --- the receiver ----------------------------------------------------------------------------

class PtyReceiver:
    """A JSON-lines receiver on a pseudo-terminal: acknowledges every report ("up"), reads and never
    answers ("silent"), or never reads ("stalled")."""

    def __init__(self, mode: str):
        self.mode = mode
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.acked: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        pending = b""
        while not self._stop.is_set():
            if self.mode == "stalled" or not select.select([self.master], [], [], 0.05)[0]:
                self._stop.wait(0.05 if self.mode == "stalled" else 0)
                continue
            pending += os.read(self.master, 65536)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._answer(line)

    def _answer(self, line: bytes) -> None:
        try:
            specimen = json.loads(line)["report"]["specimen_id"]
        except (ValueError, KeyError, TypeError):
            return  # a line cut by the sender's restart
        if self.mode == "up":
            self.acked.append(specimen)
            os.write(self.master, json.dumps({"ack": specimen}).encode() + b"\n")


class Line:
    """The configured port name (as /dev/serial/by-id) pointing at one receiver, or nowhere."""

    def __init__(self, port: Path):
        self.port = port
        self.receivers = {mode: PtyReceiver(mode) for mode in ("up", "stalled", "silent")}
        self.state = "unplugged"

    def set(self, state: str) -> None:
        self.port.unlink(missing_ok=True)
        if state != "unplugged":
            self.port.symlink_to(self.receivers[state].path)
        self.state = state

    def close(self) -> None:
        for receiver in self.receivers.values():
            receiver.close()


# --- the disk ---------------------------------------------------------------------------------

@contextlib.contextmanager
def small_disk(folder: Path, size_mb: int):
    """A filesystem of `size_mb` mounted on `folder`: a tmpfs, else an ext4 image on a loop device.
    Yields a description, or None when neither can be mounted (the disk is then not filled)."""
    folder.mkdir(parents=True, exist_ok=True)
    attempts = [(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)], f"tmpfs of {size_mb} MB")]
    image = folder.with_suffix(".img")
    if shutil.which("mkfs.ext4"):
        attempts.append((["sh", "-c", f"truncate -s {size_mb}M {image} && mkfs.ext4 -q -F {image} && "
                                      f"mount -o loop {image} {folder}"], f"ext4 image of {size_mb} MB on a loop device"))
    for command, description in attempts:
        if subprocess.run(command, capture_output=True).returncode == 0:
            try:
                yield description
            finally:
                subprocess.run(["umount", str(folder)], capture_output=True)
                image.unlink(missing_ok=True)
            return
    yield None


def fill(folder: Path) -> Path:
    """Fill the disk of `folder` to its last byte; returns the filler to delete."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as out:
        for block in (2**20, 4096, 1):  # to the last byte
            with contextlib.suppress(OSError):
                while out.write(b"\0" * block):
                    pass
    return filler


# --- the daemon -------------------------------------------------------------------------------

def replay_folder(root: Path, copies: int) -> Path:
    folder = root / "frames"
    folder.mkdir()
    for copy in range(copies):
        for i, path in enumerate(sorted(SAMPLES.glob("*.jpg"))):
            (folder / f"{copy}-{i:03d}.jpg").symlink_to(path)
    return folder


def write_config(path: Path, args, frames: Path, state: Path, fps: float, port: Path | None) -> Path:
    report = (f'link = "jsonl"\nport = "{port}"\nreply_timeout_s = 3.0\nretry_s = 1.0\n' if port else 'link = "none"\n')
    path.write_text(f"""[model]
bundle = "{args.model.resolve()}"
threads = 1
[source]
retry_initial_s = 0.5
retry_max_s = 1.0
[source.replay]
path = "{frames}"
fps = {fps}
[specimen]
target = {args.target}
[state]
directory = "{state}"
min_free_mb = 1
[report]
folder = "reports"
{report}""")
    return path


class Notify:
    """A NOTIFY_SOCKET: which daemon processes have said READY."""

    def __init__(self, folder: Path):
        self.path = folder / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.ready: dict[str, float] = {}  # process id: when it said READY

    def poll(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while True:
                fields = dict(line.split("=", 1) for line in self.sock.recv(65536).decode().splitlines() if "=" in line)
                if fields.get("READY") == "1":
                    self.ready[fields.get("MAINPID", "")] = time.monotonic()

    def counting_since(self, pid: int) -> float | None:
        return self.ready.get(str(pid))


def spawn(config: Path, log: Path, notify: Notify | None) -> subprocess.Popen:
    env = {**os.environ, "WATCHDOG_USEC": "20000000"}
    env.pop("WATCHDOG_PID", None)
    if notify is not None:
        env["NOTIFY_SOCKET"] = str(notify.path)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *DAEMON, str(config)], stdout=out, stderr=out, env=env)


def read_db(state: Path, query: str, default):
    try:
        db = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True, timeout=1.0)
        try:
            return db.execute(query).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return default


def stored_cells(state: Path) -> list[tuple]:
    """Every counted cell: (specimen number, frame, seq, x, y, class, confidence), in counting order."""
    rows = read_db(state, "SELECT s.id, c.frame, c.seq, c.x_um, c.y_um, c.label, c.confidence FROM cells c "
                          "JOIN specimens s ON s.id = c.specimen ORDER BY s.id, c.frame, c.seq", [])
    numbers = {sid: n for n, sid in enumerate(sorted({r[0] for r in rows}))}
    return [(numbers[r[0]], *r[1:]) for r in rows]


# --- the disturbed run ------------------------------------------------------------------------

@dataclass
class Timetable:
    """When the next kill, receiver change and disk fill come (seconds since the start)."""

    rng: random.Random
    kill_at: float = 0.0
    line_at: float = 0.0
    fill_at: float = 0.0
    free_at: float | None = None

    def __post_init__(self) -> None:
        self.kill_at, self.line_at, self.fill_at = self.rng.uniform(6, 15), self.rng.uniform(5, 12), self.rng.uniform(15, 30)


@dataclass
class Figures:
    kills: int = 0
    starts: int = 0
    failed_starts: int = 0
    disk_fills: int = 0
    line_changes: int = 0
    frames: dict = field(default_factory=lambda: {s: 0 for s in RECEIVER_STATES})
    seconds: dict = field(default_factory=lambda: {s: 0.0 for s in RECEIVER_STATES})


def disturbed_run(args, config: Path, state: Path, line: Line, notify: Notify, log: Path,
                  can_fill: bool, deadline: float) -> Figures:
    rng, figures, started = random.Random(args.seed), Figures(), time.monotonic()
    plan, proc, filler = Timetable(rng), None, None
    last = (time.monotonic(), None, False, "up")
    line.set("up")
    while time.monotonic() < deadline:
        now = time.monotonic() - started
        if proc is None or proc.poll() is not None:
            if proc is not None and proc.returncode == 0 and filler is None:
                break  # the replay has ended and every report had its try
            if proc is not None and proc.returncode not in (0, -signal.SIGKILL):
                figures.failed_starts += 1  # e.g. the disk was full when it opened its database
                time.sleep(1.0)
            proc = spawn(config, log, notify)
            figures.starts += 1
        if now >= plan.kill_at:
            proc.kill()
            proc.wait()
            figures.kills += 1
            plan.kill_at = now + rng.uniform(6, 20)
        if now >= plan.line_at:
            line.set(rng.choice([s for s in RECEIVER_STATES if s != line.state]))
            figures.line_changes += 1
            plan.line_at = now + rng.uniform(5, 12)
        if can_fill and filler is None and now >= plan.fill_at:
            filler, plan.free_at = fill(state), now + rng.uniform(3, 8)
            figures.disk_fills += 1
        if filler is not None and now >= plan.free_at:
            filler.unlink()
            filler, plan.fill_at = None, now + rng.uniform(20, 40)
        last = measure(state, proc, notify, line, filler is not None, last, figures)
        time.sleep(0.25)
    if filler is not None:
        filler.unlink()
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    return figures


def current_position(state: Path) -> int | None:
    rows = read_db(state, "SELECT position FROM source_positions", None)
    return None if rows is None else (rows[0][0] if rows else 0)


def measure(state: Path, proc, notify: Notify, line: Line, full: bool, last: tuple, figures: Figures) -> tuple:
    """Frames counted since the last sample, credited to the receiver's state when, for the whole
    interval, the daemon was up and counting (READY for WARM_UP_S, the disk not full) and the
    receiver's state unchanged."""
    notify.poll()
    now, position = time.monotonic(), current_position(state)
    ready = notify.counting_since(proc.pid)
    counting = proc.poll() is None and ready is not None and now - ready >= WARM_UP_S and not full \
        and position is not None
    was_time, was_position, was_counting, was_state = last
    if counting and was_counting and line.state == was_state and position >= was_position:
        figures.frames[line.state] += position - was_position
        figures.seconds[line.state] += now - was_time
    return now, position, counting, line.state


def settle(config: Path, state: Path, line: Line, log: Path, attempts: int = 5) -> int:
    """Receiver up for good: run the daemon until no report waits; returns the reports still waiting."""
    line.set("up")
    waiting = None
    for _ in range(attempts):
        spawn(config, log, None).wait(600)
        waiting = read_db(state, "SELECT COUNT(*) FROM outbox WHERE NOT link_sent", [(None,)])[0][0]
        if waiting == 0:
            break
    return waiting if waiting is not None else -1


# --- the whole benchmark ----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference")
    parser.add_argument("--copies", type=int, default=6, help="times the 34 sample fields are replayed")
    parser.add_argument("--fps", type=float, default=2.0, help="pace of the disturbed replay")
    parser.add_argument("--target", type=int, default=15, help="identified cells per specimen")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--disk-mb", type=int, default=48)
    parser.add_argument("--minutes", type=float, default=15.0, help="give up after this long")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="hv-faults-"))
    try:
        return run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> int:
    frames = replay_folder(root, args.copies)
    t0 = time.monotonic()
    reference_state = root / "reference"
    ref_config = write_config(root / "reference.toml", args, frames, reference_state, 1000.0, None)
    assert spawn(ref_config, root / "reference.log", None).wait(1800) == 0, (root / "reference.log").read_text()[-2000:]
    reference = stored_cells(reference_state)
    reference_reports = read_db(reference_state, "SELECT COUNT(*) FROM outbox", [(0,)])[0][0]
    print(f"undisturbed run: {len(reference)} cells in {reference_reports} specimens, {time.monotonic() - t0:.0f} s",
          file=sys.stderr)
    line, notify = Line(root / "ttyLIS"), Notify(root)
    try:
        with small_disk(root / "disk", args.disk_mb) as disk:
            state = root / "disk" / "state"
            config = write_config(root / "faults.toml", args, frames, state, args.fps, line.port)
            log = root / "faults.log"
            t1 = time.monotonic()
            figures = disturbed_run(args, config, state, line, notify, log, disk is not None,
                                    t1 + args.minutes * 60)
            disturbed_s = time.monotonic() - t1
            waiting = settle(config, state, line, log)
            counted = stored_cells(state)
            specimens = read_db(state, "SELECT COUNT(*) FROM specimens WHERE status = 'finished'", [(0,)])[0][0]
            seen = log_events(log.read_text(errors="replace"))
    finally:
        line.close()
    acked = line.receivers["up"].acked
    result = figures_of(args, reference, counted, reference_reports, specimens, acked, waiting, figures,
                        disk or "not filled: neither a tmpfs nor a loop device could be mounted (needs root)",
                        disturbed_s, seen)
    print_figures(result)
    if args.json:
        write_result(args.json, result)
    return 0


def figures_of(args, reference, counted, reference_reports, specimens, acked, waiting, figures: Figures,
               disk: str, seconds: float, seen: dict) -> dict:
    ref, got = set(reference), set(counted)
    rate = {s: figures.frames[s] / figures.seconds[s] if figures.seconds[s] else None for s in RECEIVER_STATES}
    up_s, down_s = figures.seconds["up"], sum(figures.seconds[s] for s in DOWN)
    fps_up = figures.frames["up"] / up_s if up_s else None
    fps_down = sum(figures.frames[s] for s in DOWN) / down_s if down_s else None
    return {
        "settings": {"copies": args.copies, "fps": args.fps, "target": args.target, "seed": args.seed,
                     "model": repo_path(args.model), "disk": disk},
        "disturbed_seconds": round(seconds, 1),
        "faults": {"kill_9": figures.kills, "starts": figures.starts, "failed_starts": figures.failed_starts,
                   "receiver_changes": figures.line_changes, "disk_fills": figures.disk_fills},
        "cells": {"reference": len(reference), "counted": len(counted), "lost": len(ref - got),
                  "counted_twice_or_extra": len(counted) - len(got) + len(got - ref),
                  "identical_to_reference": counted == reference},
        "reports": {"specimens": specimens, "reference_specimens": reference_reports,
                    "delivered": len(set(acked)), "duplicated": len(acked) - len(set(acked)),
                    "lost": specimens - len(set(acked)), "still_waiting": waiting},
        "fps": {"receiver_up": fps_up, "receiver_down": fps_down,
                "down_over_up": fps_down / fps_up if fps_up and fps_down is not None else None,
                "by_receiver_state": rate, "seconds_by_receiver_state": figures.seconds},
        "daemon_log": seen,
    }


def log_events(text: str) -> dict:
    """How often the daemon said what the faults should make it say."""
    return {"disk_full_stops": text.count("STOPPED: disk full"), "failed_tries": text.count("not delivered yet"),
            "sends_stopped_by_shutdown": text.count("send stopped for shutdown"),
            "skipped_frames": text.count("skipped unreadable frame"), "tracebacks": text.count("Traceback")}


def print_figures(r: dict) -> None:
    c, rep, f, fa = r["cells"], r["reports"], r["fps"], r["faults"]
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    print(f"faults over {r['disturbed_seconds']:.0f} s: {fa['kill_9']} kill -9, {fa['starts']} starts "
          f"({fa['failed_starts']} failed), {fa['receiver_changes']} receiver changes, {fa['disk_fills']} disk fills "
          f"(disk: {r['settings']['disk']})")
    print(f"cells: {c['counted']} counted vs {c['reference']} undisturbed; lost {c['lost']}, counted twice or extra "
          f"{c['counted_twice_or_extra']}; identical to the undisturbed run: {c['identical_to_reference']}")
    print(f"reports: {rep['specimens']} specimens ({rep['reference_specimens']} undisturbed), {rep['delivered']} "
          f"delivered, {rep['duplicated']} duplicated, {rep['lost']} lost, {rep['still_waiting']} still waiting")
    print(f"frames per second: receiver up {fmt(f['receiver_up'])}, down {fmt(f['receiver_down'])} "
          f"(ratio {fmt(f['down_over_up'])}); by state "
          + ", ".join(f"{s} {fmt(v)} over {f['seconds_by_receiver_state'][s]:.0f} s"
                      for s, v in f["by_receiver_state"].items()))
    print("daemon log: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in r["daemon_log"].items()))


if __name__ == "__main__":
    sys.exit(main())
