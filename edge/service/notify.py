"""systemd notification (sd_notify) over the NOTIFY_SOCKET datagram protocol: no dependency."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

logger = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes:
    """NOTIFY_SOCKET as a socket address: a leading '@' names the abstract namespace."""
    return b"\0" + value[1:].encode() if value.startswith("@") else value


def watchdog_interval_s(environ=os.environ) -> float | None:
    """Seconds between the watchdog's deadlines (WATCHDOG_USEC) when it is meant for this process."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 if int(usec) > 0 else None
    except ValueError:
        logger.warning("WATCHDOG_USEC=%r is not a number; watchdog pings are off", usec)
        return None


class Notifier:
    """Sends READY, STATUS, WATCHDOG and STOPPING to systemd; does nothing outside systemd."""

    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET")
        self.address = socket_address(address) if address else None
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) if address else None
        self.interval_s = watchdog_interval_s(environ)
        self._last_ping = 0.0
        self._lock = threading.Lock()

    def send(self, *assignments: str) -> bool:
        """One datagram of NAME=value lines, never waiting: when the receiver's queue is full the
        message is dropped (the next one follows a frame later). A lost notification is logged,
        never raised."""
        if self.sock is None:
            return False
        message = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with self._lock:
                self.sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except BlockingIOError:
            logger.debug("sd_notify %s dropped: the notification queue is full", assignments[0].split("=")[0])
            return False
        except OSError as err:
            logger.warning("sd_notify %s failed: %s", assignments[0].split("=")[0], err)
            return False
        return True

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self, status: str = "stopping") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        """WATCHDOG=1, at most four times per watchdog interval."""
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.interval_s / 4:
            self._last_ping = now
            self.send("WATCHDOG=1")

    def wait(self, stop: threading.Event, seconds: float) -> bool:
        """Wait on `stop` for up to `seconds`, pinging the watchdog meanwhile; True when stopped."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            step = min(left, self.interval_s / 4) if self.interval_s else left
            if stop.wait(step):
                return True
            self.watchdog()
        return stop.is_set()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
