"""The running daemon's web API from a shell command on the same machine (specimen start, finish, status)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from hematovision.errors import HematovisionError

from ..config import WebConfig

TIMEOUT_S = 15.0  # above the page's own wait for the frame loop (service/specimens.py COMMAND_WAIT_S)


class DaemonUnreachable(HematovisionError):
    """No daemon answers at the configured web address."""


def local_url(web: WebConfig) -> str:
    """The web page's address as seen from this machine (a wildcard address is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "localhost": "127.0.0.1"}.get(web.host, web.host)
    return f"http://{'[' + host + ']' if ':' in host else host}:{web.port}"


def call(web: WebConfig, method: str, path: str, body: dict | None = None,
         timeout_s: float = TIMEOUT_S) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of one API request, with the configured password. Raises DaemonUnreachable
    when nothing answers there, or something that is not this API."""
    request = urllib.request.Request(local_url(web) + path, method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Accept": "application/json", "Content-Type": "application/json"})
    if web.token:
        request.add_header("Authorization", f"Bearer {web.token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - our own loopback URL
            return response.status, _json(response.read(), web)
    except urllib.error.HTTPError as err:
        return err.code, _json(err.read(), web)
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DaemonUnreachable(f"no daemon answers at {local_url(web)} ({reason})") from err


def _json(data: bytes, web: WebConfig) -> dict:
    try:
        answer = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DaemonUnreachable(f"{local_url(web)} does not answer as Hematovision's web page; check web.port") from err
    if not isinstance(answer, dict):
        raise DaemonUnreachable(f"{local_url(web)} does not answer as Hematovision's web page; check web.port")
    return answer
