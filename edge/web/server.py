"""The web page's HTTP server (waitress) in its own threads, started and stopped with the service."""

from __future__ import annotations

import errno
import logging
import signal
import threading
from pathlib import Path

from hematovision.errors import DataError, HematovisionError

from ..config import WebConfig, check_web

logger = logging.getLogger(__name__)

STOP_WAIT_S = 5.0
LOOP_S = 0.25  # the server's loop looks this often whether it is to stop


class WebUnavailable(HematovisionError):
    """The web page cannot listen on its address and port."""


class WebServer:
    """A waitress server for `app` on web.host:web.port; requests are answered by web.threads threads and never
    touch the frame loop. Use as a context manager: listening on enter, stopped on exit.

    Raises WebUnavailable when the port is taken or the address is not this machine's.
    """

    def __init__(self, app, web: WebConfig):
        import waitress.server  # noqa: PLC0415

        host = "127.0.0.1" if web.host == "localhost" else web.host  # one socket, not one per address
        try:
            self.server = waitress.server.create_server(
                app, host=host, port=web.port, threads=web.threads, ident="hematovision",
                max_request_body_size=web.max_request_kb * 1024, max_request_header_size=16 * 1024,
                channel_timeout=30, connection_limit=32, expose_tracebacks=False, clear_untrusted_proxy_headers=True)
        except OSError as err:
            why = "the port is in use by another program" if err.errno == errno.EADDRINUSE else err.strerror
            raise WebUnavailable(f"web page: cannot listen on {web.host}:{web.port} ({why}); stop the other program, "
                                 "or set another web.port (or web.enabled = false)") from err
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)
        self._stopping = threading.Event()

    @property
    def url(self) -> str:
        host, port = self.server.effective_host, self.server.effective_port
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def __enter__(self) -> WebServer:
        self._thread.start()
        logger.info("web page at %s", self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        """Serve until stopped; every socket is opened and closed in this thread, none from outside."""
        from waitress import wasyncore  # noqa: PLC0415

        try:
            while not self._stopping.is_set():
                wasyncore.loop(timeout=LOOP_S, use_poll=True, map=self.server._map, count=1)
        except Exception:  # noqa: BLE001 - the page may die; counting goes on
            logger.exception("the web page stopped; counting goes on")
        finally:
            wasyncore.close_all(self.server._map, ignore_all=True)
            self.server.task_dispatcher.shutdown(timeout=STOP_WAIT_S)

    def stop(self) -> None:
        """Stop listening, close every connection and end the request threads (within LOOP_S + STOP_WAIT_S)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(LOOP_S + 2 * STOP_WAIT_S)
        elif not self._thread.ident:  # never started
            self._close_unstarted()

    def _close_unstarted(self) -> None:
        from waitress import wasyncore  # noqa: PLC0415

        wasyncore.close_all(self.server._map, ignore_all=True)
        self.server.task_dispatcher.shutdown(timeout=STOP_WAIT_S)


def serve_folder(folder: Path, host: str, port: int, token: str = "") -> int:
    """`hematovision-edge web FOLDER`: the page over a folder of reports until SIGINT or SIGTERM; 0 then.
    Raises ConfigError (another address than loopback without a password), DataError (no such folder),
    WebUnavailable."""
    from .app import create_app  # noqa: PLC0415
    from .folder import FolderSpecimens  # noqa: PLC0415

    web = WebConfig(enabled=True, host=host, port=port, token=token)
    check_web(web, "hematovision-edge web (the password: $HEMATOVISION_WEB_TOKEN)")
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: no such folder; give the folder the JSON reports are in")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        specimens = FolderSpecimens(Path(folder))
        specimens.keep_waiting_cells()  # a sign-off cut short before its cells were kept
        with WebServer(create_app(specimens, web), web) as server:
            print(f"reports of {folder} at {server.url} (Ctrl-C ends)", flush=True)
            stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0
