"""The serial line behind a small protocol; the only module that imports pyserial."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from hematovision.errors import ConfigError, LinkFailed

logger = logging.getLogger(__name__)

CHECK_PORT = "check the cable / port name"


class ByteLine(Protocol):
    """A byte line to a receiving system (a serial port, a pseudo-terminal)."""

    def write(self, data: bytes) -> None:
        """Write all of `data`; raises LinkFailed when the line is gone."""

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

    def __post_init__(self) -> None:
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
    """ByteLine over an open pyserial port; every port error becomes LinkFailed."""

    def __init__(self, port, name: str) -> None:
        self._port = port
        self._name = name

    def write(self, data: bytes) -> None:
        with self._errors("write to"):
            self._port.write(data)
            self._port.flush()

    def read(self, size: int, timeout_s: float) -> bytes:
        with self._errors("read from"):
            self._port.timeout = max(timeout_s, 0.0)
            first = self._port.read(1)  # pyserial's read(n) would wait for all n bytes
            if not first or size == 1:
                return first
            return first + self._port.read(min(size - 1, self._port.in_waiting))

    def discard_input(self) -> None:
        with self._errors("reset"):
            self._port.reset_input_buffer()

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
def open_serial(port: str, settings: SerialSettings = SerialSettings()) -> Iterator[SerialLine]:
    """Open any port pyserial opens (a device path, a pseudo-terminal, a pyserial URL).

    Raises LinkFailed when the port is missing or busy.
    """
    import serial

    try:
        handle = serial.serial_for_url(
            port, baudrate=settings.baudrate, bytesize=settings.bytesize,
            parity=settings.parity, stopbits=settings.stopbits, timeout=0)
    except (*_port_errors(), ValueError) as err:
        raise LinkFailed(f"cannot open serial port {port!r}: {err}; {CHECK_PORT}") from err
    try:
        yield SerialLine(handle, port)
    finally:
        with contextlib.suppress(*_port_errors()):
            handle.close()
