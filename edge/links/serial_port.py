"""The serial line behind a small protocol; the only module that imports pyserial."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from hematovision.errors import ConfigError, LinkFailed, SendCancelled

logger = logging.getLogger(__name__)

CHECK_PORT = "check the cable / port name"
_SLICE_S = 0.1  # longest single wait: a cancel is seen within this
_CHUNK = 4096  # bytes offered to the line at once


class ByteLine(Protocol):
    """A byte line to a receiving system (a serial port, a pseudo-terminal)."""

    def write(self, data: bytes) -> None:
        """Write all of `data` within bounded time; raises LinkFailed when the line is gone or
        the receiver stops taking bytes."""

    def read(self, size: int, timeout_s: float) -> bytes:
        """Up to `size` bytes, b'' after `timeout_s` of silence; raises LinkFailed."""

    def discard_input(self) -> None:
        """Drop bytes received but not yet read."""


@dataclass(frozen=True)
class SerialSettings:
    """Line settings of the receiving system (8N1 at 9600 baud is the ASTM custom)."""

    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1
    write_timeout_s: float = 15.0  # a receiver that takes no byte for this long has failed

    def __post_init__(self) -> None:
        if not self.write_timeout_s > 0:
            raise ConfigError(f"serial write timeout {self.write_timeout_s} must be above 0 seconds")
        if self.baudrate <= 0 or self.bytesize not in (5, 6, 7, 8):
            raise ConfigError(f"serial settings {self} are out of range: baudrate must be "
                              "positive and bytesize 5..8")
        if self.parity not in ("N", "E", "O", "M", "S") or self.stopbits not in (1, 1.5, 2):
            raise ConfigError("serial.parity must be N, E, O, M or S and stopbits 1, 1.5 or 2")


@dataclass(frozen=True)
class SendResult:
    """What delivering one report took."""

    link: str
    port: str
    specimen_id: str
    messages_sent: int
    frames_sent: int
    retries: int
    duration_s: float


class SerialLine:
    """ByteLine over an open pyserial port; every port error becomes LinkFailed.

    No call waits unbounded: a write that the receiver stops taking fails after
    `settings.write_timeout_s` without progress (and after twice the line's transmission time
    in all), and every wait is cut into slices that end at once when `cancel` is set.
    """

    def __init__(self, port, name: str, settings: SerialSettings | None = None,
                 cancel: threading.Event | None = None) -> None:
        self._port = port
        self._name = name
        self._settings = settings or SerialSettings()
        self._cancel = cancel or threading.Event()
        self.unsent = False  # a write ended with bytes the receiver did not take

    def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        stall_s = self._settings.write_timeout_s
        deadline = time.monotonic() + stall_s + 2 * len(view) * 10 / self._settings.baudrate
        progress = time.monotonic()
        self.unsent = True
        with self._errors("write to"):
            while view:
                self._check_cancel()
                now = time.monotonic()
                if now - progress > stall_s:
                    raise LinkFailed(f"the receiver on {self._name} took no data for {stall_s:g} s; it is not "
                                     f"reading the line: {CHECK_PORT} and that the receiving program is running")
                if now > deadline:
                    raise LinkFailed(f"the receiver on {self._name} took {len(data) - len(view)} of {len(data)} "
                                     "bytes in twice the time the line needs; check its baud rate and flow control")
                written = self._write_some(view, min(_SLICE_S, max(deadline - now, 0.001)))
                if written:
                    view, progress = view[written:], time.monotonic()
        self.unsent = False

    def _write_some(self, view: memoryview, wait_s: float) -> int:
        """Bytes of `view` the line took within `wait_s` (0 when it took none)."""
        try:
            fd = self._port.fileno()
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            fd = None  # a pyserial URL handler: its own write timeout bounds the wait
        if fd is None:
            self._port.write_timeout = self._settings.write_timeout_s
            return self._port.write(bytes(view)) or len(view)
        if not select.select([], [fd], [], wait_s)[1]:
            return 0
        try:
            return os.write(fd, view[:_CHUNK])
        except BlockingIOError:
            return 0

    def read(self, size: int, timeout_s: float) -> bytes:
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with self._errors("read from"):
            while True:
                self._check_cancel()
                left = deadline - time.monotonic()
                self._port.timeout = min(max(left, 0.0), _SLICE_S)
                first = self._port.read(1)  # pyserial's read(n) would wait for all n bytes
                if first:
                    return first if size == 1 else first + self._port.read(min(size - 1, self._port.in_waiting))
                if left <= _SLICE_S:
                    return b""

    def discard_input(self) -> None:
        with self._errors("reset"):
            self._port.reset_input_buffer()

    def discard_output(self) -> None:
        """Drop bytes written but not sent: after a write the receiver stopped taking, closing the
        port must not wait in the kernel for it. (Only then: on a pseudo-terminal this also drops
        what the other end has not read yet, such as a final EOT.)"""
        with contextlib.suppress(*_port_errors(), AttributeError, NotImplementedError):
            self._port.reset_output_buffer()

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise SendCancelled(f"sending on {self._name} stopped: the daemon is stopping; the report stays "
                                "in the outbox and is sent after the restart")

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except _port_errors() as err:
            raise LinkFailed(f"cannot {action} {self._name}: {err}; the line was "
                             f"disconnected, {CHECK_PORT}") from err


def _port_errors() -> tuple[type[BaseException], ...]:
    """What pyserial raises when a line goes away (termios.error is not an OSError)."""
    import serial

    try:
        import termios
    except ImportError:  # not on a POSIX system
        return serial.SerialException, OSError
    return serial.SerialException, OSError, termios.error


@contextlib.contextmanager
def open_serial(port: str, settings: SerialSettings = SerialSettings(),
                cancel: threading.Event | None = None) -> Iterator[SerialLine]:
    """Open any port pyserial opens (a device path, a pseudo-terminal, a pyserial URL); every
    wait on it ends when `cancel` is set (SendCancelled).

    Raises LinkFailed when the port is missing or busy.
    """
    import serial

    try:
        handle = serial.serial_for_url(
            port, baudrate=settings.baudrate, bytesize=settings.bytesize,
            parity=settings.parity, stopbits=settings.stopbits, timeout=0)
    except (*_port_errors(), ValueError) as err:
        raise LinkFailed(f"cannot open serial port {port!r}: {err}; {CHECK_PORT}") from err
    line = SerialLine(handle, port, settings, cancel)
    try:
        yield line
    except BaseException:
        if line.unsent:
            line.discard_output()
        raise
    finally:
        with contextlib.suppress(*_port_errors()):
            handle.close()
