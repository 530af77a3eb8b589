"""Report delivery off the frame loop: a hung, silent or absent receiver never stops counting,
never feeds the watchdog, and never holds up SIGTERM."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
import termios
import threading
import time
import tty
from pathlib import Path

import pytest

import hematovision.edge.service.daemon as daemon_module
from hematovision.edge.config import load_config
from hematovision.edge.service.daemon import STATE_FILE, Daemon, make_link, open_pipeline
from hematovision.edge.service.notify import Notifier
from hematovision.edge.reports.report import commissioning_report
from hematovision.edge.links.send import SendSettings, send_report
from hematovision.edge.links.serial_port import SerialSettings, open_serial
from hematovision.edge.capture.sources import open_source
from hematovision.edge.service.state import Store
from hematovision.errors import LinkFailed, SendCancelled
from test_daemon import position, spawn, write_config

FPS = 20.0  # the replay's pace: counting at this rate needs a few tens of ms per frame


class PtyReceiver:
    """A JSON-lines receiver on the master end of a pseudo-terminal.

    "ack" answers every report; "silent" reads everything and never answers (a host program
    that has hung after reading); "hung" never reads at all (the line fills up and blocks).
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)
        self.reports: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PtyReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        for fd in (self.master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)

    def queued(self) -> int:
        """Bytes the sender wrote that this receiver has not read."""
        return struct.unpack("I", fcntl.ioctl(self.master, termios.FIONREAD, b"\0" * 4))[0]

    def _run(self) -> None:
        pending = b""
        while not self._stop.is_set():
            if self.mode == "hung":
                self._stop.wait(0.05)
                continue
            if not select.select([self.master], [], [], 0.05)[0]:
                continue
            pending += os.read(self.master, 65536)
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._line(line)

    def _line(self, line: bytes) -> None:
        message = json.loads(line)
        specimen = message["report"]["specimen_id"]
        self.reports.append(specimen)
        if self.mode == "ack":
            os.write(self.master, json.dumps({"ack": specimen}).encode() + b"\n")


def plug(port: Path, receiver: PtyReceiver) -> None:
    """Point the configured port (a stable name, as /dev/serial/by-id) at this receiver."""
    port.unlink(missing_ok=True)
    port.symlink_to(receiver.path)


def jsonl_config(tmp_path, tiny_bundle, samples_bccd, reply_timeout_s: float) -> tuple[Path, Path]:
    port = tmp_path / "ttyLIS"
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages",
                          source__replay={"fps": FPS, "loop": True}, specimen={"id": "", "target": 1},
                          report={"link": "jsonl", "port": str(port), "reply_timeout_s": reply_timeout_s,
                                  "retry_s": 0.1})
    return config, port


@contextlib.contextmanager
def listening(listener):
    """Read sd_notify messages as they come, as systemd does (the daemon drops what a full queue refuses)."""
    done = threading.Event()

    def read():
        while not done.is_set():
            listener.receive(0.05)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        yield listener
    finally:
        done.set()
        reader.join(2)


def frames_in(state: Path, seconds: float) -> float:
    """Frames per second counted over `seconds`, from the committed source position."""
    start = position(state)
    time.sleep(seconds)
    return (position(state) - start) / seconds


def finished_specimens(state: Path) -> int:
    if not (state / STATE_FILE).exists():
        return 0
    with Store(state / STATE_FILE) as store:
        return store.db.execute("SELECT COUNT(*) FROM specimens WHERE status = 'finished'").fetchone()[0]


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.05)


# --- the serial line: every wait bounded, every wait cancellable ------------------------------

def test_a_receiver_that_never_reads_fails_the_write_within_the_timeout():
    with PtyReceiver("hung") as receiver, open_serial(receiver.path, SerialSettings(write_timeout_s=0.5)) as line:
        started = time.monotonic()
        with pytest.raises(LinkFailed, match="took no data for 0.5 s; it is not reading the line"):
            line.write(b"x" * 1_000_000)
        assert time.monotonic() - started < 1.5 and receiver.queued() < 1_000_000


def test_cancel_ends_a_blocked_write_and_a_silent_wait_at_once():
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    with PtyReceiver("hung") as receiver:
        started = time.monotonic()
        with pytest.raises(SendCancelled, match="the daemon is stopping"):
            send_report(commissioning_report().to_dict(), "jsonl", receiver.path,
                        SendSettings(serial=SerialSettings(write_timeout_s=60.0), jsonl_ack_timeout_s=60.0), cancel)
        assert time.monotonic() - started < 1.0
    cancel.clear()
    threading.Timer(0.3, cancel.set).start()
    with PtyReceiver("silent") as receiver, open_serial(receiver.path, cancel=cancel) as line:
        started = time.monotonic()
        with pytest.raises(SendCancelled):
            line.read(1, 60.0)
        assert time.monotonic() - started < 1.0


# --- the daemon: real processes on real pseudo-terminals -------------------------------------

def test_hung_receiver_never_stops_counting_and_sigterm_ends_the_send_at_once(
        tmp_path, tiny_bundle, samples_bccd, notify_listener):
    config, port = jsonl_config(tmp_path, tiny_bundle, samples_bccd, reply_timeout_s=60.0)
    state, log = tmp_path / "state", tmp_path / "daemon.log"
    with PtyReceiver("hung") as receiver:
        plug(port, receiver)
        proc = spawn(config, log, notify_listener)
        try:
            notify_listener.wait_for("READY", 60, proc.pid)
            wait_until(lambda: receiver.queued() > 0, 60, "a report send")  # the outbox is stuck in a write
            with listening(notify_listener):
                before = len(notify_listener.messages)
                rate = frames_in(state, 4.0)
            pings = sum(m.get("WATCHDOG") == "1" for m in notify_listener.messages[before:])
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, log.read_text()[-3000:]
            took = time.monotonic() - stopping
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    print(f"\nhung receiver: {rate:.1f} frames/s counted while a send was stuck (paced at {FPS:g}); "
          f"SIGTERM ended it in {took:.2f} s; {finished_specimens(state)} specimens finished")
    assert rate >= 0.4 * FPS and pings >= 2, text[-3000:]  # frames flow, so the watchdog is fed
    assert took < 3.0 and "send stopped for shutdown" in text
    assert "Traceback" not in text
    with Store(state / STATE_FILE) as store:
        assert store.pending_reports(False, True)  # nothing was lost: the reports wait in the outbox


def test_receiver_down_costs_counting_nothing(tmp_path, tiny_bundle, samples_bccd):
    config, port = jsonl_config(tmp_path, tiny_bundle, samples_bccd, reply_timeout_s=1.0)
    state, log = tmp_path / "state", tmp_path / "daemon.log"
    with PtyReceiver("ack") as up, PtyReceiver("silent") as down:
        plug(port, up)
        proc = spawn(config, log)
        try:
            wait_until(lambda: len(up.reports) >= 1, 60, "a delivered report")
            rate_up = frames_in(state, 4.0)
            plug(port, down)
            wait_until(lambda: len(down.reports) >= 1, 30, "a send to the silent receiver")
            rate_down = frames_in(state, 4.0)
            delivered_up, tried_down = len(up.reports), len(down.reports)
            plug(port, up)  # the receiver is back: what waited is delivered
            wait_until(lambda: set(down.reports) <= set(up.reports), 30, "delivery of the reports that waited")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0, log.read_text()[-3000:]
    print(f"\nreceiver up {rate_up:.1f} frames/s, down {rate_down:.1f} frames/s "
          f"({rate_down / rate_up:.0%}); {delivered_up} delivered before, {tried_down} tries while down")
    assert rate_up >= 0.4 * FPS and rate_down >= 0.75 * rate_up
    assert len(set(up.reports)) == len(up.reports)  # each report acknowledged once


def test_watchdog_stops_when_frames_stop_even_while_a_send_is_in_progress(
        tmp_path, tiny_bundle, samples_bccd, notify_listener, monkeypatch):
    config, port = jsonl_config(tmp_path, tiny_bundle, samples_bccd, reply_timeout_s=60.0)
    cfg, stop, frames = load_config(config), threading.Event(), threading.Event()
    real_open = open_source

    @contextlib.contextmanager
    def stalling_after_frames(config, position, profile=None):
        """A camera that delivers 40 frames and then hangs (a stuck USB camera)."""
        with real_open(config, position, profile) as source:
            inner = source.next_frame

            def next_frame(stop_event):
                if source.position >= 40:
                    frames.set()
                    stop_event.wait()
                    return None
                return inner(stop_event)

            source.next_frame = next_frame
            yield source

    monkeypatch.setattr(daemon_module, "open_source", stalling_after_frames)
    notifier = Notifier({"NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": "400000"})

    def run_daemon():
        with Store(cfg.state_dir() / STATE_FILE) as store:
            Daemon(cfg, open_pipeline(cfg), store, notifier, stop, make_link(cfg.report, stop)).run()

    with PtyReceiver("hung") as receiver, listening(notify_listener):
        plug(port, receiver)
        runner = threading.Thread(target=run_daemon)
        runner.start()
        try:
            assert frames.wait(60), "the replay did not reach the stall"
            fed = sum("WATCHDOG" in m for m in notify_listener.messages)
            wait_until(lambda: receiver.queued() > 0, 30, "a report send")
            time.sleep(0.5)  # a ping sent with the last frame may still be on its way
            before = len(notify_listener.messages)
            time.sleep(2.0)  # five watchdog intervals with no frame
            starved = [m for m in notify_listener.messages[before:] if "WATCHDOG" in m]
        finally:
            stop.set()
            runner.join(10)
    assert not runner.is_alive()
    assert fed >= 3  # fed while frames came ...
    assert starved == []  # ... and not once after they stopped, although the outbox thread was busy
