"""ASTM report link: drives the E1381 sender core over a serial line."""

from __future__ import annotations

import logging
import time
from datetime import datetime

from ..reports.report import Report
from .astm import (REPLIES, AstmReceiver, AstmTiming, AwaitReply, Pause, RecordSettings,
                   SenderCounts, Write, build_frames, report_records, sender_steps)
from .serial_port import ByteLine, SendResult

logger = logging.getLogger(__name__)

_POLL_S = 0.05


def send_report_astm(report: Report, line: ByteLine, timing: AstmTiming = AstmTiming(),
                     records: RecordSettings = RecordSettings(),
                     wbc_10e9_per_l: float | None = None, port: str = "") -> SendResult:
    """Send one report as an E1394 message over E1381.

    Raises LinkFailed when the receiver does not answer, refuses, or the line drops;
    ConfigError when a class has no result code.
    """
    started = time.monotonic()
    message = report_records(report, records, datetime.now().astimezone(), wbc_10e9_per_l)
    counts = send_records(message, line, timing, records.encoding)
    result = SendResult("astm", port, report.specimen_id, 1, counts.frames_sent,
                        counts.retransmissions + counts.enq_sent - 1,
                        time.monotonic() - started)
    logger.info("sent report %s over ASTM: %d frames, %d retries, %.2f s",
                report.specimen_id, result.frames_sent, result.retries, result.duration_s)
    return result


def send_records(records: list[str], line: ByteLine, timing: AstmTiming,
                 encoding: str = "latin-1") -> SenderCounts:
    """Send one message of records; returns the counts of what it took.

    Raises LinkFailed as the sender core or the line does.
    """
    counts = SenderCounts()
    steps = sender_steps(build_frames(records, encoding), timing, counts)
    line.discard_input()
    reply: bytes | None = None
    while True:
        try:
            step = steps.send(reply)
        except StopIteration:
            return counts
        reply = _perform(step, line, timing, encoding)


def _perform(step, line: ByteLine, timing: AstmTiming, encoding: str) -> bytes | None:
    if isinstance(step, Write):
        line.write(step.data)
        return None
    if isinstance(step, AwaitReply):
        return await_reply(line, step.timeout_s)
    if isinstance(step, Pause):
        answer_while_paused(line, step.seconds, timing, encoding)
        return None
    raise TypeError(f"unknown sender step {step!r}")


def await_reply(line: ByteLine, timeout_s: float) -> bytes | None:
    """The first ACK, NAK, ENQ or EOT within `timeout_s`, or None; other bytes are noise."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        byte = line.read(1, left)
        if byte in REPLIES:
            return byte
        if byte:
            logger.debug("ignoring %r while waiting for a reply", byte)
    return None


def answer_while_paused(line: ByteLine, seconds: float, timing: AstmTiming,
                        encoding: str) -> None:
    """Keep off the line for `seconds`; if the computer system sends meanwhile (it has
    priority after contention), receive its message to the end, then drop it.
    """
    receiver = AstmReceiver(encoding=encoding)
    deadline = last_byte = time.monotonic()
    deadline += seconds
    while (now := time.monotonic()) < deadline or receiver.receiving:
        if receiver.receiving and now - last_byte > timing.receive_timeout_s:
            receiver.expire()
            continue
        data = line.read(256, max(min(deadline - now, _POLL_S), 0.001))
        if data:
            last_byte = time.monotonic()
            reply = receiver.feed(data)
            if reply:
                line.write(reply)
    for message in receiver.messages:
        logger.warning("the computer system sent %d records while we waited; the device "
                       "does not take messages over ASTM, so they were not used", len(message))
