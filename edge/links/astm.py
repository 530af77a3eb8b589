"""ASTM E1381 framing and sender/receiver state machines, and E1394 records: no I/O here."""

from __future__ import annotations

import logging
import re
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from hematovision import __version__
from hematovision.errors import ConfigError, LinkFailed

from ..counting.checks import FULL_REVIEW_BANNER
from ..reports.report import Report

logger = logging.getLogger(__name__)

STX, ETX, EOT, ENQ, ACK, LF, CR, NAK, ETB = b"\x02", b"\x03", b"\x04", b"\x05", b"\x06", \
    b"\n", b"\r", b"\x15", b"\x17"
# The bytes a sender waits for; anything else on the line while waiting is noise.
REPLIES = frozenset({ACK, NAK, ENQ, EOT})
MAX_TEXT = 240  # characters of text per frame (E1381: 247 with the frame overhead)
MAX_FRAME = MAX_TEXT + 7
_CONTROL = frozenset(range(0x20)) - {0x0D} | {0x7F}


# --- framing -------------------------------------------------------------------------

class FrameError(ValueError):
    """A received frame is malformed or its checksum does not match."""


@dataclass(frozen=True)
class Frame:
    """A frame accepted by the parser: its number, text and whether it ends a record."""

    number: int
    text: bytes
    final: bool


def checksum(body: bytes) -> bytes:
    """Two upper-case hex digits of the byte sum (frame number through ETB/ETX) mod 256."""
    return b"%02X" % (sum(body) % 256)


def build_frame(number: int, text: bytes, final: bool) -> bytes:
    """One frame: STX FN text ETB|ETX C1 C2 CR LF."""
    body = b"%d" % (number % 8) + text + (ETX if final else ETB)
    return STX + body + checksum(body) + CR + LF


def build_frames(records: list[str], encoding: str = "latin-1") -> list[bytes]:
    """The frames of one message: each record ends with CR and is cut into <=240-byte
    pieces (ETB frames, the last one ETX); frame numbers run 1..7, 0, 1...
    """
    frames: list[bytes] = []
    for record in records:
        data = record.encode(encoding, "replace") + CR
        pieces = [data[i:i + MAX_TEXT] for i in range(0, len(data), MAX_TEXT)]
        for i, piece in enumerate(pieces):
            frames.append(build_frame(len(frames) + 1, piece, i == len(pieces) - 1))
    return frames


def parse_frame(raw: bytes) -> Frame:
    """Check and unpack one frame from STX up to and including the final LF.

    Raises FrameError when the layout, frame number, text or checksum is wrong.
    """
    if len(raw) < 7 or len(raw) > MAX_FRAME:
        raise FrameError(f"frame length {len(raw)} outside 7..{MAX_FRAME}")
    if raw[:1] != STX or raw[-2:] != CR + LF or raw[-5:-4] not in (ETB, ETX):
        raise FrameError("frame layout is not STX FN text ETB|ETX C1 C2 CR LF")
    if raw[1:2] not in b"01234567":
        raise FrameError(f"frame number {raw[1:2]!r} is not 0..7")
    text = raw[2:-5]
    if any(b in _CONTROL for b in text):
        raise FrameError("frame text holds a control character")
    if checksum(raw[1:-4]) != raw[-4:-2]:
        raise FrameError(f"checksum {raw[-4:-2]!r} does not match {checksum(raw[1:-4])!r}")
    return Frame(int(raw[1:2]), text, raw[-5:-4] == ETX)


# --- sender state machine ------------------------------------------------------------

@dataclass(frozen=True)
class AstmTiming:
    """Timers and retry limits of E1381; the defaults are the standard's, tests shorten them."""

    reply_timeout_s: float = 15.0
    busy_wait_s: float = 10.0        # after a NAK to our ENQ
    contention_wait_s: float = 20.0  # after an ENQ answered by ENQ: the computer has priority
    receive_timeout_s: float = 30.0  # a receiver drops a message idle this long
    max_frame_attempts: int = 6      # "not accepted six times" then abort with EOT
    max_enq_attempts: int = 6
    retransmit_on_timeout: bool = True  # E1381 aborts on a reply timeout; most LIS retry

    def __post_init__(self) -> None:
        if min(self.reply_timeout_s, self.receive_timeout_s) <= 0 or \
                min(self.busy_wait_s, self.contention_wait_s) < 0:
            raise ConfigError("astm timers must be positive seconds")
        if min(self.max_frame_attempts, self.max_enq_attempts) < 1:
            raise ConfigError("astm.max_frame_attempts and max_enq_attempts must be at least 1")


@dataclass(frozen=True)
class Write:
    """Step: write these bytes to the line."""

    data: bytes


@dataclass(frozen=True)
class AwaitReply:
    """Step: wait for one of REPLIES; the driver sends back that byte, or None on timeout."""

    timeout_s: float


@dataclass(frozen=True)
class Pause:
    """Step: keep off the line for `seconds`, answering the other side as a receiver."""

    seconds: float


Step = Write | AwaitReply | Pause


@dataclass
class SenderCounts:
    """What one send took, filled in as the sender runs."""

    enq_sent: int = 0
    frames_sent: int = 0
    retransmissions: int = 0
    contentions: int = 0


def sender_steps(frames: list[bytes], timing: AstmTiming,
                 counts: SenderCounts) -> Generator[Step, bytes | None, SenderCounts]:
    """E1381 sender as steps for a driver: establish, send every frame, terminate.

    Raises LinkFailed (after writing EOT) when the receiver never answers, stays busy, or
    does not accept a frame after the allowed attempts.
    """
    yield from _establish(timing, counts)
    for index, frame in enumerate(frames):
        yield from _transfer(index, frame, timing, counts)
    yield Write(EOT)
    return counts


def _establish(timing: AstmTiming, counts: SenderCounts):
    for _ in range(timing.max_enq_attempts):
        yield Write(ENQ)
        counts.enq_sent += 1
        reply = yield AwaitReply(timing.reply_timeout_s)
        if reply == ACK:
            return
        if reply is None:
            yield Write(EOT)
            raise LinkFailed(f"no receiver answered ENQ within {timing.reply_timeout_s:g} s; "
                             "check the cable / port name and that the receiver is running")
        if reply == ENQ:
            counts.contentions += 1
        logger.info("ENQ answered by %r; waiting before the next try", reply)
        yield Pause(timing.contention_wait_s if reply == ENQ else timing.busy_wait_s)
    raise LinkFailed(f"the receiver refused {timing.max_enq_attempts} requests to send "
                     "(busy or line contention); try again later")


def _transfer(index: int, frame: bytes, timing: AstmTiming, counts: SenderCounts):
    last = "NAK"
    for attempt in range(timing.max_frame_attempts):
        counts.frames_sent += 1
        counts.retransmissions += attempt > 0
        yield Write(frame)
        reply = yield AwaitReply(timing.reply_timeout_s)
        if reply in (ACK, EOT):  # EOT here is a receiver interrupt request: may be ignored
            return
        last = "NAK" if reply is not None else f"no reply in {timing.reply_timeout_s:g} s"
        if reply is None and not timing.retransmit_on_timeout:
            break
        logger.debug("frame %d not accepted (%s), attempt %d", index + 1, last, attempt + 1)
    yield Write(EOT)
    raise LinkFailed(f"frame {index + 1} was not accepted after {attempt + 1} attempt(s) "
                     f"(last: {last}); check the cable and the receiver's serial settings")


# --- receiver state machine ----------------------------------------------------------

@dataclass
class AstmReceiver:
    """E1381 receiver: feed it line bytes, write back what feed returns; complete messages
    (ending in an E1394 L record) collect in `messages`, duplicates are ACKed but dropped.
    """

    busy: bool = False
    encoding: str = "latin-1"
    messages: list[list[str]] = field(default_factory=list)
    frames_accepted: int = 0
    duplicates: int = 0
    naks: int = 0
    _state: str = "idle"
    _expected: int = 1
    _text: bytearray = field(default_factory=bytearray)
    _frame: bytearray | None = None
    _last_final: bool = True
    _in_message: int = 0

    @property
    def receiving(self) -> bool:
        """True between an accepted ENQ and the EOT that ends the message."""
        return self._state == "transfer"

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the line; return the replies to write (ACK, NAK)."""
        return b"".join(self._byte(data[i:i + 1]) for i in range(len(data)))

    def expire(self) -> None:
        """The receive timer ran out: drop the incomplete message, wait for ENQ again."""
        if self.receiving:
            logger.warning("receiver timed out; discarding an incomplete message")
        self._reset()

    def _reset(self) -> None:
        self._state, self._expected, self._frame, self._last_final = "idle", 1, None, True
        self._text, self._in_message = bytearray(), 0

    def _byte(self, b: bytes) -> bytes:
        if self._state == "idle":
            return self._idle_byte(b)
        if self._frame is not None:
            return self._frame_byte(b)
        if b == STX:
            self._frame = bytearray(STX)
        elif b == EOT:
            self._finish()
        return b""

    def _idle_byte(self, b: bytes) -> bytes:
        if b != ENQ:
            return b""
        if self.busy:
            return NAK
        self._reset()
        self._state = "transfer"
        return ACK

    def _frame_byte(self, b: bytes) -> bytes:
        if b in (STX, EOT):  # never inside a frame: a new frame, or the end of the message
            self._frame = None
            return self._byte(b)
        self._frame += b
        if b == LF:
            raw, self._frame = bytes(self._frame), None
            return self._take_frame(raw)
        if len(self._frame) > MAX_FRAME:
            self._frame = None
            self.naks += 1
            return NAK
        return b""

    def _take_frame(self, raw: bytes) -> bytes:
        try:
            frame = parse_frame(raw)
        except FrameError as err:
            logger.debug("NAK: %s", err)
            self.naks += 1
            return NAK
        if frame.number == self._expected:
            self._text += frame.text
            self._last_final = frame.final
            self._expected = (self._expected + 1) % 8
            self.frames_accepted += 1
            self._in_message += 1
            return ACK
        if frame.number == (self._expected - 1) % 8 and self._in_message:
            self.duplicates += 1  # our ACK was lost: the sender repeated the last frame
            return ACK
        self.naks += 1
        return NAK

    def _finish(self) -> None:
        records = bytes(self._text).decode(self.encoding, "replace").split("\r")
        if self._in_message and records[-1] == "" and self._last_final:
            records.pop()
            if records and records[-1].startswith("L"):
                self.messages.append(records)
            else:
                logger.warning("message ended without an L record; discarded")
        self._reset()


# --- E1394 records -------------------------------------------------------------------

DEFAULT_PERCENT_CODES = MappingProxyType({
    "neutrophil": "NEUT%", "lymphocyte": "LYMPH%", "monocyte": "MONO%",
    "eosinophil": "EO%", "basophil": "BASO%", "ig": "IG%"})
DEFAULT_ABSOLUTE_CODES = MappingProxyType({
    "neutrophil": "NEUT#", "lymphocyte": "LYMPH#", "monocyte": "MONO#",
    "eosinophil": "EO#", "basophil": "BASO#", "ig": "IG#"})
_ESCAPES = {"&": "&E&", "|": "&F&", "\\": "&R&", "^": "&S&"}
_UNESCAPES = {"E": "&", "F": "|", "R": "\\", "S": "^"}
_PATIENT_FIELDS = (3, 4, 5)


@dataclass(frozen=True)
class RecordSettings:
    """How one receiving system wants the E1394 records; result codes per class."""

    percent_codes: Mapping[str, str] = field(default_factory=lambda: DEFAULT_PERCENT_CODES)
    absolute_codes: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ABSOLUTE_CODES)
    nrbc_code: str = "NRBC"  # nucleated red cells per 100 white cells
    nrbc_units: str = "/100 WBC"
    unidentified_code: str = "UNIDCNT"
    counted_code: str = "CELLCNT"  # white cells counted: identified plus unidentified
    order_test_id: str = "DIFF"
    patient_id_field: int = 3  # P.3 practice-assigned, P.4 laboratory-assigned, P.5 id no. 3
    absolute_units: str = "10^9/L"
    sender_name: str = "Hematovision"
    encoding: str = "latin-1"

    def __post_init__(self) -> None:
        if self.patient_id_field not in _PATIENT_FIELDS:
            raise ConfigError(f"astm.patient_id_field {self.patient_id_field} must be 3, 4 or 5")


def escape_field(value: str) -> str:
    """A value made safe inside one field: delimiters become E1394 escape sequences and
    control characters become spaces.
    """
    value = "".join(" " if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in value)
    return re.sub(r"[&|\\^]", lambda m: _ESCAPES[m.group()], value)


def unescape_field(value: str) -> str:
    """Undo escape_field for one field or component."""
    return re.sub(r"&([EFRS])&", lambda m: _UNESCAPES[m.group(1)], value)


def astm_time(iso: str | datetime) -> str:
    """YYYYMMDDHHMMSS in the wall-clock time the ISO 8601 value carries."""
    when = datetime.fromisoformat(iso) if isinstance(iso, str) else iso
    return when.strftime("%Y%m%d%H%M%S")


def report_records(report: Report, settings: RecordSettings, now: datetime,
                   wbc_10e9_per_l: float | None = None) -> list[str]:
    """H, P, O, C, R (one per result) and L records of one report. The comment records carry
    code^message: first "needs_full_review" with its banner when a flag (outside_training) says every
    cell must be verified, then each flag, worst first.

    The results: each differential class in percent (and absolute when the white count is known:
    `wbc_10e9_per_l`, else the report's), NRBC per 100 WBC where the report has it, unidentified and
    counted white cells. Their status (E1394 R.9): P while the report is preliminary; once a person has
    signed it, F (final) for a result the same as in the preliminary report, C (correction of a result
    transmitted before) for one the person's changes altered; the order's report type (O.26) is C when
    any result is.

    Raises ConfigError when a class has no result code in `settings`.
    """
    results = _results(report, settings, wbc_10e9_per_l)
    statuses = _statuses(report, results, settings, wbc_10e9_per_l)
    report_type = "P" if not report.verified else "C" if "C" in statuses else "F"
    records = [_header(report, settings, now), _patient(report, settings),
               _order(report, settings, now, report_type)]
    records += [_join(["C", str(i), "I", f"{escape_field(code)}^{escape_field(text)}", "G"])
                for i, (code, text) in enumerate(_comments(report), 1)]
    records += [_result(i, code, value, units, status, report)
                for i, ((code, value, units), status) in enumerate(zip(results, statuses), 1)]
    return records + ["L|1|N"]


def _comments(report: Report) -> list[tuple[str, str]]:
    banner = [("needs_full_review", FULL_REVIEW_BANNER)] if report.needs_full_review else []
    return banner + [(f.code, f.message) for f in report.flags]


def _statuses(report: Report, results: list[tuple[str, str, str]], settings: RecordSettings,
              wbc: float | None) -> list[str]:
    """Each result's status: P (preliminary); F, or C where it differs from the preliminary report's."""
    if not report.verified:
        return ["P"] * len(results)
    from ..reports.review import preliminary_of  # noqa: PLC0415

    before = {code: value for code, value, _ in _results(preliminary_of(report), settings, wbc)}
    return ["F" if before.get(code) == value else "C" for code, value, _ in results]


def _join(fields: list[str]) -> str:
    return "|".join(fields).rstrip("|")


def _header(report: Report, s: RecordSettings, now: datetime) -> str:
    sender = "^".join(escape_field(v) for v in (s.sender_name, __version__, report.device_id))
    return _join(["H", "\\^&", "", "", sender, "", "", "", "", "", "", "P", "LIS2-A2",
                  astm_time(now)])


def _patient(report: Report, s: RecordSettings) -> str:
    fields = ["P", "1", "", "", ""]
    fields[s.patient_id_field - 1] = escape_field(report.specimen_id)
    return _join(fields)


def _order(report: Report, s: RecordSettings, now: datetime, report_type: str) -> str:
    fields = [""] * 26
    fields[:6] = ["O", "1", escape_field(report.specimen_id), "",
                  "^^^" + escape_field(s.order_test_id), "R"]
    fields[22] = astm_time(report.finished_at or now)
    fields[25] = report_type
    return _join(fields)


def _results(report: Report, s: RecordSettings, wbc: float | None) -> list[tuple[str, str, str]]:
    out = [(_code(s.percent_codes, c.name, "percent"), f"{c.percent:.1f}", "%")
           for c in report.classes]
    wbc = report.wbc_10e9_per_l if wbc is None else wbc  # the white count given to send, else the report's
    if wbc is not None:
        out += [(_code(s.absolute_codes, c.name, "absolute"),
                 f"{wbc * c.percent / 100:.2f}", s.absolute_units) for c in report.classes]
    if report.nrbc is not None and report.nrbc.per_100_wbc is not None:
        out.append((s.nrbc_code, f"{report.nrbc.per_100_wbc:.1f}", s.nrbc_units))
    # Rejected detections (e.g. platelets) are not sent: they are the model's false white-cell
    # detections, not a platelet count or estimate, and a receiver has no test to file them
    # under; they stay in the report files and gallery for the person who verifies it.
    out.append((s.unidentified_code, str(report.unidentified), "cells"))
    out.append((s.counted_code, str(report.white_cells), "cells"))
    return out


def _code(codes: Mapping[str, str], name: str, kind: str) -> str:
    if name not in codes:
        raise ConfigError(f"no {kind} result code for class {name!r}; add it to the ASTM "
                          f"{kind} codes of this receiving system")
    return codes[name]


def _result(seq: int, code: str, value: str, units: str, status: str, report: Report) -> str:
    operator = report.verified_by
    started = astm_time(report.started_at)
    finished = astm_time(report.finished_at) if report.finished_at else ""
    return _join(["R", str(seq), "^^^" + escape_field(code), escape_field(value),
                  escape_field(units), "", "", "", status, "", escape_field(operator),
                  started, finished, escape_field(report.device_id)])


@dataclass(frozen=True)
class ReceivedResult:
    """One R record read back: value, units and result status."""

    value: str
    units: str
    status: str


@dataclass(frozen=True)
class ReceivedReport:
    """What a receiving system reads out of one message."""

    sender: tuple[str, ...]
    patient_ids: tuple[str, ...]
    specimen_id: str
    comments: tuple[tuple[str, ...], ...]  # each C record's text, as its components (code, message)
    results: Mapping[str, ReceivedResult]


def parse_message(records: list[str]) -> ReceivedReport:
    """Read the records of one message back (receiver side, used by tests).

    Raises ValueError when the message does not start with H and end with L.
    """
    if not records or not records[0].startswith("H|\\^&") or not records[-1].startswith("L"):
        raise ValueError("an E1394 message starts with an H record and ends with an L record")
    by_type: dict[str, list[list[str]]] = {}
    for record in records:
        by_type.setdefault(record[:1], []).append(record.split("|"))
    header = _pad(by_type["H"][0], 14)
    patient = _pad(by_type["P"][0], 5)
    order = _pad(by_type["O"][0], 26)
    results = {unescape_field(r[2].split("^")[3]): ReceivedResult(
        unescape_field(r[3]), unescape_field(r[4]), r[8])
        for r in (_pad(r, 14) for r in by_type.get("R", []))}
    return ReceivedReport(
        sender=tuple(unescape_field(c) for c in header[4].split("^")),
        patient_ids=tuple(unescape_field(v) for v in patient[2:5]),
        specimen_id=unescape_field(order[2]),
        comments=tuple(tuple(unescape_field(v) for v in _pad(c, 4)[3].split("^")) for c in by_type.get("C", [])),
        results=results)


def _pad(fields: list[str], n: int) -> list[str]:
    return fields + [""] * (n - len(fields))
