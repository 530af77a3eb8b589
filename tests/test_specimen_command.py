"""`hematovision-edge specimen start|finish|status` from a shell reaches the running daemon, or says why not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from test_daemon import spawn, write_config
from test_web_api import free_port
from test_web_browser import _answers, wait_for

EDGE = [sys.executable, "-m", "hematovision.edge.cli"]


def edge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command as a user types it, in a shell of its own (its own environment, no STATE_DIRECTORY)."""
    clean = {k: v for k, v in os.environ.items() if k != "STATE_DIRECTORY"}
    return subprocess.run([*EDGE, *args], capture_output=True, text=True, timeout=120, env={**clean, **(env or {})})


def test_specimen_start_status_and_finish_from_a_shell_reach_the_running_daemon(tmp_path, tiny_bundle, samples_bccd):
    port = free_port()
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages",
                          source__replay={"fps": 4.0, "loop": True},
                          specimen={"id": "", "auto_start": False, "target": 100000},
                          web={"enabled": True, "port": port})
    process = spawn(config, tmp_path / "daemon.log")
    try:
        wait_for("web page", lambda: _answers(f"http://127.0.0.1:{port}/api/status"), 60)
        started = edge("specimen", "start", "--id", "S-7", "--accession", "A-1", "--operator", "Bob", "--wbc", "7.1",
                       "--config", str(config))
        assert (started.returncode, started.stdout.strip()) == (0, "started S-7"), started.stderr
        again = edge("specimen", "start", "--id", "S-8", "--config", str(config))
        assert again.returncode == 1 and "refused" in again.stdout and "S-7 is open" in again.stdout
        status = json.loads(edge("specimen", "status", "--json", "--config", str(config)).stdout)
        assert (status["specimen_id"], status["state"], status["accession"], status["operator"]) == (
            "S-7", "counting", "A-1", "Bob")
        assert "specimen S-7: counting" in edge("specimen", "status", "--config", str(config)).stdout
        finished = edge("specimen", "finish", "--config", str(config))
        assert (finished.returncode, finished.stdout.strip()) == (0, "finished")
        assert "no specimen open" in edge("specimen", "status", "--config", str(config)).stdout
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_without_the_web_page_or_a_state_folder_the_command_says_where_the_daemons_state_is(tmp_path, tiny_bundle,
                                                                                              samples_bccd):
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages", state={"directory": ""})
    home = tmp_path / "home"
    result = edge("specimen", "start", "--id", "S-1", "--config", str(config), env={"XDG_STATE_HOME": str(home)})
    assert result.returncode == 1 and "queued" not in result.stdout
    assert "/var/lib/hematovision" in result.stderr and "state.directory" in result.stderr
    assert not home.exists()  # nothing landed in the caller's own state folder


def test_with_the_web_page_enabled_but_no_daemon_the_command_queues_in_the_configured_state(tmp_path, tiny_bundle,
                                                                                            samples_bccd):
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages",
                          specimen={"auto_start": False}, web={"enabled": True, "port": free_port()})
    result = edge("specimen", "start", "--id", "S-5", "--config", str(config))
    assert result.returncode == 0 and "queued" in result.stdout and "no daemon answers" in result.stdout
    status = edge("specimen", "status", "--config", str(config))
    assert "1 command(s) waiting for the daemon" in status.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: run as a user to check the refusal")
def test_a_state_folder_this_user_cannot_write_is_refused_naming_the_service_user(tmp_path, tiny_bundle, samples_bccd):
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages")
    state.chmod(0o555)
    try:
        result = edge("specimen", "start", "--id", "S-1", "--config", str(config))
    finally:
        state.chmod(0o755)
    assert result.returncode == 1 and "not writable" in result.stderr and "sudo -u hematovision" in result.stderr
