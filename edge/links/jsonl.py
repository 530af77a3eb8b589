"""JSON-lines link for simple hosts: a pure command handler, a serve loop, report sending."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hematovision.errors import HematovisionError, LinkFailed

from .serial_port import CHECK_PORT, ByteLine, SendResult

logger = logging.getLogger(__name__)

MAX_LINE = 8192  # bytes, newline excluded
MAX_TARGET = 100_000
MAX_ID = 128
_FIELDS: dict[str, dict[str, type]] = {
    "START": {"specimen_id": str, "target": int},
    "STATUS": {},
    "STOP": {},
    "REPORT": {"specimen_id": str},
    "LIST": {},
}


class Controller(Protocol):
    """What a host may ask of the counter; results must be JSON-ready."""

    def start(self, specimen_id: str, target: int) -> Mapping[str, object]: ...

    def status(self) -> Mapping[str, object]: ...

    def stop(self) -> Mapping[str, object]: ...

    def report(self, specimen_id: str) -> Mapping[str, object] | None: ...

    def list(self) -> list[str]: ...


class RequestError(ValueError):
    """A host's line is not a valid command."""


@dataclass(frozen=True)
class Request:
    """A checked host command."""

    cmd: str
    specimen_id: str | None = None
    target: int | None = None


def handle_line(line: bytes, controller: Controller) -> bytes:
    """Answer one host line with exactly one JSON line; never raises.

    The answer is {"ok": true, "cmd": ..., ...} or {"ok": false, "error": "..."}.
    """
    try:
        answer = _answer(line, controller)
    except Exception:  # noqa: BLE001 - a host must always get its one answer line
        logger.exception("the controller failed on a host command")
        answer = {"ok": False, "error": "internal error on the device; see its log"}
    return encode_answer(answer)


def _answer(line: bytes, controller: Controller) -> dict:
    try:
        request = parse_request(line)
    except RequestError as err:
        return {"ok": False, "error": str(err)}
    try:
        return {**_dispatch(request, controller), "ok": True, "cmd": request.cmd}
    except HematovisionError as err:
        return {"ok": False, "cmd": request.cmd, "error": str(err)}


def encode_answer(answer: Mapping[str, object]) -> bytes:
    """One ASCII JSON line; an answer that cannot be encoded becomes an error answer."""
    try:
        text = json.dumps(answer, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError):
        logger.error("could not encode an answer to the host", exc_info=True)
        text = '{"ok":false,"error":"the device could not encode its answer"}'
    return text.encode("ascii") + b"\n"


def parse_request(line: bytes) -> Request:
    """Check one host line (one trailing newline allowed).

    Raises RequestError naming what is wrong.
    """
    obj = _load_object(line)
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or cmd not in _FIELDS:
        raise RequestError(f"unknown command; send one of {', '.join(_FIELDS)} as \"cmd\"")
    wanted = _FIELDS[cmd]
    unknown = sorted(set(obj) - set(wanted) - {"cmd"})
    if unknown:
        raise RequestError(f"{cmd} takes no field(s) {', '.join(repr(k)[:40] for k in unknown)}")
    values = {name: _field(obj, cmd, name, kind) for name, kind in wanted.items()}
    return Request(cmd, **values)


def _load_object(line: bytes) -> dict:
    if len(line) > MAX_LINE + 2:
        raise RequestError(f"line longer than {MAX_LINE} bytes")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError("line is not UTF-8 text") from err
    text = text.removesuffix("\n").removesuffix("\r")
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise RequestError("line is not valid JSON") from err
    if not isinstance(obj, dict):
        raise RequestError("each line must be one JSON object such as {\"cmd\": \"STATUS\"}")
    return obj


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _field(obj: dict, cmd: str, name: str, kind: type) -> str | int:
    if name not in obj:
        raise RequestError(f"{cmd} needs \"{name}\"")
    value = obj[name]
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TARGET:
            raise RequestError(f"{cmd} \"{name}\" must be a whole number 1..{MAX_TARGET}")
        return value
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID or not value.isprintable() \
            or not value.strip():
        raise RequestError(f"{cmd} \"{name}\" must be printable text of 1..{MAX_ID} characters")
    return value


def _dispatch(request: Request, controller: Controller) -> dict:
    if request.cmd == "START":
        return dict(controller.start(request.specimen_id, request.target))
    if request.cmd == "STATUS":
        return dict(controller.status())
    if request.cmd == "STOP":
        return dict(controller.stop())
    if request.cmd == "LIST":
        return {"specimens": list(controller.list())}
    report = controller.report(request.specimen_id)
    if report is None:
        raise LinkFailed(f"no report for specimen {request.specimen_id!r}; LIST shows the "
                         "specimens with reports")
    return {"report": dict(report)}


# --- the line shells -----------------------------------------------------------------

@dataclass
class LineSplitter:
    """Cuts a byte stream into lines; an over-long line is passed on cut short (so that it
    is answered as too long) and the rest of it up to its newline is dropped.
    """

    max_line: int = MAX_LINE
    _buffer: bytearray = field(default_factory=bytearray)
    _dropping: bool = False

    def feed(self, data: bytes) -> list[bytes]:
        lines = []
        for chunk in data.splitlines(keepends=True):
            lines += self._chunk(chunk)
        return lines

    def _chunk(self, chunk: bytes) -> list[bytes]:
        ended = chunk.endswith(b"\n")
        if self._dropping:
            self._dropping = not ended
            return []
        self._buffer += chunk
        if len(self._buffer) > self.max_line + 2:
            cut, self._buffer = bytes(self._buffer[:self.max_line + 3]), bytearray()
            self._dropping = not ended
            return [cut]
        if ended:
            line, self._buffer = bytes(self._buffer), bytearray()
            return [line]
        return []


def serve_commands(line: ByteLine, controller: Controller, stop: threading.Event,
                   poll_s: float = 0.2) -> None:
    """Answer host command lines until `stop` is set. Raises LinkFailed if the line drops."""
    splitter = LineSplitter()
    while not stop.is_set():
        for request in splitter.feed(line.read(4096, poll_s)):
            line.write(handle_line(request, controller))


def send_report_jsonl(report: Mapping[str, object], line: ByteLine, ack_timeout_s: float = 15.0,
                      port: str = "") -> SendResult:
    """Write {"type": "report", "report": {...}} and wait for {"ack": specimen_id}.

    Raises LinkFailed when the host does not acknowledge in time or answers with a nak.
    """
    started = time.monotonic()
    specimen = str(report["specimen_id"])
    message = json.dumps({"type": "report", "report": report}, ensure_ascii=True,
                         allow_nan=False, separators=(",", ":")).encode("ascii") + b"\n"
    line.discard_input()
    line.write(message)
    _await_ack(line, specimen, ack_timeout_s)
    result = SendResult("jsonl", port, specimen, 1, 1, 0, time.monotonic() - started)
    logger.info("sent report %s over JSON lines in %.2f s", specimen, result.duration_s)
    return result


def _await_ack(line: ByteLine, specimen: str, timeout_s: float) -> None:
    splitter = LineSplitter()
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        for text in splitter.feed(line.read(4096, left)):
            if _host_reply(text, specimen):
                return
    raise LinkFailed(f"the host did not acknowledge report {specimen!r} within "
                     f"{timeout_s:g} s; {CHECK_PORT} and that the host program is running")


def _host_reply(text: bytes, specimen: str) -> bool:
    try:
        obj = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        logger.debug("ignoring a line from the host that is not JSON")
        return False
    if not isinstance(obj, dict):
        return False
    if obj.get("nak") == specimen:
        raise LinkFailed(f"the host refused report {specimen!r}: {str(obj.get('error'))[:200]}")
    return obj.get("ack") == specimen
