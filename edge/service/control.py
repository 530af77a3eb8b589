"""`specimen start|finish|status` from a shell: through the running daemon's web API, else its state folder."""

from __future__ import annotations

import json
import logging
import os
import sys

from hematovision.classes import KNOWN_CLASSES
from hematovision.errors import ConfigError, HematovisionError

from ..config import Config, load_config
from ..web.backend import CommandResult, StartRequest
from ..web.client import DaemonUnreachable, call, local_url
from .daemon import EX_CONFIG, STATE_FILE, setup_logging
from .specimens import StateSpecimens
from .state import StateError

logger = logging.getLogger(__name__)

SERVICE_STATE = "/var/lib/hematovision"  # StateDirectory= of systemd/hematovision.service


def specimen_main(config_path, action: str, start: StartRequest | None = None, as_json: bool = False) -> int:
    """Start or finish a specimen, or show the daemon's status: 0 done (or queued for a daemon not running),
    1 refused or unreachable, 78 for a bad configuration. Output on stdout, errors on stderr, one line each."""
    setup_logging()
    try:
        config = load_config(config_path)
    except ConfigError as err:
        logger.error("%s", err)
        return EX_CONFIG
    try:
        if config.web.enabled:
            try:
                return through_web(config, action, start, as_json)
            except DaemonUnreachable as err:
                why = str(err)
        else:
            why = f"web.enabled is false in {config.path}"
        return through_state(config, action, start, as_json, why)
    except HematovisionError as err:
        print(f"hematovision-edge specimen {action}: error: {err}", file=sys.stderr)
        return 1


def through_web(config: Config, action: str, start: StartRequest | None, as_json: bool) -> int:
    """Raises DaemonUnreachable when no daemon answers."""
    if action == "status":
        code, answer = call(config.web, "GET", "/api/status")
    else:
        body = {"action": action, **({k: v for k, v in vars(start).items() if v is not None} if start else {})}
        body["wbc"] = body.pop("wbc_10e9_per_l", None)
        code, answer = call(config.web, "POST", "/api/specimen", {k: v for k, v in body.items() if v is not None})
    if code == 401:
        raise StateError(f"the web page at {local_url(config.web)} wants its password: run as a user who can read "
                         f"web.token in {config.path}")
    if code >= 400 and code != 409:
        raise StateError(f"{local_url(config.web)} answered {code}: {answer.get('error', answer)}")
    if action == "status":
        print(json.dumps(answer) if as_json else status_text(answer))
        return 0
    return _print_result(CommandResult(answer.get("command"), answer.get("result")), as_json, "")


def through_state(config: Config, action: str, start: StartRequest | None, as_json: bool, why: str) -> int:
    """The command queued in the daemon's state folder (taken at its next frame, or when it next runs)."""
    path = daemon_state(config, why)
    specimens = StateSpecimens(path, KNOWN_CLASSES, _no_report, command_wait_s=0.0)
    try:
        if action == "status":
            status = specimens.status()
            print(json.dumps(status) if as_json else status_text(status) + f" (from {path}; {why})")
            return 0
        result = specimens.command(action, start)
    finally:
        specimens.close()
    return _print_result(result, as_json, f" ({why})")


def daemon_state(config: Config, why: str):
    """The daemon's state database, writable by this user. Raises StateError saying where it is and what to do."""
    path = config.state_dir() / STATE_FILE
    told = bool(config.state.directory or os.environ.get("STATE_DIRECTORY"))
    if not told and not path.exists():
        raise StateError(f"{why}, and state.directory is empty in {config.path}: the service keeps its state in "
                         f"{SERVICE_STATE}, not in {path.parent}; set state.directory = \"{SERVICE_STATE}\" there, "
                         "or web.enabled = true")
    for place in (path, path.parent):
        if place.exists() and not os.access(place, os.W_OK):
            raise StateError(f"{why}, and {place} is not writable by this user; run it as the service's user: "
                             f"sudo -u hematovision hematovision-edge specimen ... --config {config.path}")
    return path


def _no_report(store, specimen):  # status and commands need no report
    raise StateError("no report is built from a shell")


def _print_result(result: CommandResult, as_json: bool, queued_why: str) -> int:
    if as_json:
        print(json.dumps(result.to_dict()))
    elif result.result is None:
        print(f"queued as command {result.command}: the daemon takes it at its next frame{queued_why}")
    else:
        print(result.result)
    return 1 if result.refused else 0


def status_text(status: dict) -> str:
    """The daemon's status in one line."""
    if status.get("specimen_id"):
        counts = ", ".join(f"{n} {c}" for c, n in status.get("counts", {}).items() if n)
        frames = status.get("frames") or {}
        text = (f"specimen {status['specimen_id']}: counting, {status['counted']}/{status['target']} cells"
                f"{' (' + counts + ')' if counts else ''}, {status.get('unidentified', 0)} unidentified; frames "
                f"{frames.get('used', 0)} used, skipped {frames.get('skipped_blur', 0)} blurred, "
                f"{frames.get('skipped_motion', 0)} moving, {frames.get('unusable', 0)} unusable")
    else:
        text = "no specimen open"
    last = status.get("last_finished")
    if last and not status.get("specimen_id"):
        text += f"; last: {last['specimen_id']} finished ({last['reason']}), {last['counted']}/{last['target']} cells"
    if status.get("pending_commands"):
        text += f"; {status['pending_commands']} command(s) waiting for the daemon"
    return text
