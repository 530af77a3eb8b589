"""`hematovision-edge model install / rollback / status`, and the daemon switching bundles between specimens only."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

import hematovision.edge.service.daemon as daemon_module
from conftest import REPO, edited_bundle
from hematovision.edge.cli import main as edge_main
from hematovision.edge.config import load_config
from hematovision.edge.service.daemon import STATE_FILE, Daemon, open_pipeline
from hematovision.edge.service.models import HISTORY, Models
from hematovision.edge.service.state import Store
from test_daemon import RecordingNotifier

REFERENCE = REPO / "models" / "reference"


def meta(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


def links(models: Path) -> dict[str, str | None]:
    """Where current and previous point, and the history's length: what a refused change must leave alone."""
    out = {name: os.readlink(models / name) if os.path.lexists(models / name) else None
           for name in ("current", "previous")}
    history = models / HISTORY
    out["history"] = len(history.read_text().splitlines()) if history.exists() else 0
    out["versions"] = sorted(p.name for p in (models / "versions").iterdir()) if (models / "versions").exists() else []
    return out


@pytest.fixture
def reference_copy(tmp_path) -> Path:
    """The committed reference bundle, copied (a valid bundle to install and to break)."""
    return Path(shutil.copytree(REFERENCE, tmp_path / "reference"))


@pytest.fixture
def renamed_bundle(tiny_bundle, tmp_path) -> Path:
    """A second valid bundle: the tiny one under another name, stamped again (another meta_sha256)."""
    def edit(m):
        m["name"] = "hematovision-tiny-v2"

    return edited_bundle(tiny_bundle, tmp_path / "tiny-v2", edit)


def install(state: Path, bundle: Path, *more: str) -> int:
    return edge_main(["model", "install", str(bundle), "--state", str(state), *more])


# --- install, refusal, rollback, status --------------------------------------------------------

def test_install_makes_the_bundle_current_keeps_the_one_used_before_and_rollback_restores_it(
        tmp_path, reference_copy, tiny_bundle, monkeypatch, capsys):
    monkeypatch.setenv("HEMATOVISION_MODEL", str(tiny_bundle))  # what the device counts with before any install
    state = tmp_path / "state"
    assert install(state, reference_copy) == 0
    out = capsys.readouterr().out
    assert "16 sample cells classified" in out and "from its next specimen" in out
    models = Models(state / "models")
    assert models.current().meta_sha256 == meta(REFERENCE)["meta_sha256"]
    assert models.previous().meta_sha256 == meta(tiny_bundle)["meta_sha256"]
    shutil.rmtree(reference_copy)  # the installed copy stands on its own
    assert (state / "models" / "current" / "model.tflite").read_bytes() == (REFERENCE / "model.tflite").read_bytes()

    assert edge_main(["model", "rollback", "--state", str(state)]) == 0
    assert models.current().meta_sha256 == meta(tiny_bundle)["meta_sha256"]
    assert models.previous().meta_sha256 == meta(REFERENCE)["meta_sha256"]
    history = [json.loads(line) for line in (state / "models" / HISTORY).read_text().splitlines()]
    assert [h["action"] for h in history] == ["install", "rollback"] and all(h["at"] and h["user"] for h in history)
    assert history[1]["current"]["meta_sha256"] == meta(tiny_bundle)["meta_sha256"]

    capsys.readouterr()
    assert edge_main(["model", "status", "--state", str(state)]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"current: {meta(tiny_bundle)['name']} (bundle {meta(tiny_bundle)['meta_sha256'][:12]}")
    assert f"previous: {meta(REFERENCE)['name']} (bundle {meta(REFERENCE)['meta_sha256'][:12]}, exported " \
           f"{meta(REFERENCE)['created_at']})" in status and "rollback by" in status


def test_installing_the_installed_bundle_again_changes_nothing(tmp_path, reference_copy, capsys):
    state = tmp_path / "state"
    assert install(state, reference_copy) == 0
    before = links(state / "models")
    assert install(state, reference_copy) == 0
    assert "installed already: nothing changed" in capsys.readouterr().out
    assert links(state / "models") == before


def _flip_a_model_byte(bundle: Path) -> None:
    data = bytearray((bundle / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.tflite").write_bytes(bytes(data))


def _swap_two_classes(bundle: Path) -> None:
    m = meta(bundle)
    m["classes"][0], m["classes"][1] = m["classes"][1], m["classes"][0]
    (bundle / "bundle.json").write_text(json.dumps(m, indent=2))


@pytest.mark.parametrize("damage, named", [(_flip_a_model_byte, r"model\.tflite: sha256 .* does not match"),
                                           (_swap_two_classes, r"meta_sha256 does not match its content")])
def test_a_damaged_bundle_is_refused_and_the_installed_one_stays(tmp_path, reference_copy, tiny_bundle, damage, named,
                                                                 capsys):
    state = tmp_path / "state"
    assert install(state, tiny_bundle) == 0
    before = links(state / "models")
    damage(reference_copy)
    capsys.readouterr()
    assert install(state, reference_copy) == 1
    import re

    assert re.search(named, capsys.readouterr().err)
    assert links(state / "models") == before
    assert Models(state / "models").current().meta_sha256 == meta(tiny_bundle)["meta_sha256"]


def test_a_bundle_that_cannot_be_tried_on_sample_cells_is_not_installed(tmp_path, reference_copy, capsys):
    empty = tmp_path / "no-samples"
    empty.mkdir()
    assert install(tmp_path / "state", reference_copy, "--samples", str(empty)) == 1
    assert "fewer than 2 cells could be classified" in capsys.readouterr().err
    assert not (tmp_path / "state" / "models" / "current").exists()


def test_rollback_without_a_previous_bundle_is_refused(tmp_path, capsys):
    assert edge_main(["model", "rollback", "--state", str(tmp_path / "state")]) == 1
    assert "no previous bundle to roll back to" in capsys.readouterr().err


def test_status_names_the_bundle_an_adapted_one_was_adapted_from(tmp_path, tiny_bundle, capsys):
    base = meta(tiny_bundle)["meta_sha256"]

    def edit(m):
        m["name"] = "hematovision-tiny-site"
        m["adaptation"] = {"base_meta_sha256": base, "cells": 40}

    adapted = edited_bundle(tiny_bundle, tmp_path / "adapted", edit)
    assert install(tmp_path / "state", adapted) == 0
    capsys.readouterr()
    assert edge_main(["model", "status", "--state", str(tmp_path / "state"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["current"]["adapted_from"] == base and status["current"]["name"] == "hematovision-tiny-site"
    assert edge_main(["model", "status", "--state", str(tmp_path / "state")]) == 0
    assert f"adapted from bundle {base[:12]}" in capsys.readouterr().out


def test_install_refuses_a_configuration_whose_model_bundle_would_ignore_it(daemon_config, reference_copy, capsys):
    config = daemon_config()  # model.bundle names the tiny bundle's folder
    assert edge_main(["model", "install", str(reference_copy), "--config", str(config)]) == 1
    assert 'set model.bundle = ""' in capsys.readouterr().err


def test_the_configuration_counts_with_the_installed_bundle_once_there_is_one(daemon_config, tiny_bundle,
                                                                               reference_copy, monkeypatch):
    monkeypatch.setenv("HEMATOVISION_MODEL", str(tiny_bundle))
    config = load_config(daemon_config(model={"bundle": ""}))
    assert config.bundle_path() == tiny_bundle
    assert edge_main(["model", "install", str(reference_copy), "--config", str(config.path)]) == 0
    assert config.bundle_path() == config.state_dir() / "models" / "current"
    assert meta(config.bundle_path())["meta_sha256"] == meta(REFERENCE)["meta_sha256"]


# --- the daemon: a bundle is taken between specimens ----------------------------------------------

def run_with_actions(config_path: Path, actions: dict, stop_at: int | None = None, monkeypatch=None) -> None:
    """Run the daemon in this process over its replay; `actions[n](store)` runs just before frame n is read (as a
    person at a shell would act while it counts); with `stop_at` the daemon is stopped there (as by SIGTERM)."""
    config = load_config(config_path)
    stop = threading.Event()
    real_open = daemon_module.open_source

    @contextlib.contextmanager
    def acting(cfg, position, profile=None):
        with real_open(cfg, position, profile) as source, Store(config.state_dir() / STATE_FILE) as shell:
            inner = source.next_frame

            def next_frame(stop_event):
                if source.position in actions:
                    actions[source.position](shell)
                if source.position == stop_at:
                    stop.set()
                return inner(stop_event)

            source.next_frame = next_frame
            yield source

    monkeypatch.setattr(daemon_module, "open_source", acting)
    with Store(config.state_dir() / STATE_FILE, config.state.min_free_mb * 2**20) as store:
        assert Daemon(config, open_pipeline(config), store, RecordingNotifier(stop), stop).run() == 0


def specimen_bundles(state: Path) -> dict[str, tuple[str, str]]:
    """Specimen id -> (bundle stamp its row records, bundle stamp its report names)."""
    with Store(state / STATE_FILE) as store:
        return {s.specimen_id: (s.bundle.meta_sha256, store.report(s.specimen_id)["model"]["meta_sha256"])
                for s, _, _ in store.specimens()}


@pytest.fixture
def installed_config(daemon_config, tiny_bundle, tmp_path):
    """A daemon counting with the installed bundle (the tiny one installed first), specimens started by command."""
    path = daemon_config(model={"bundle": ""}, specimen={"auto_start": False, "target": 100000})
    state = load_config(path).state_dir()
    Models(state / "models").install(tiny_bundle)
    with Store(state / STATE_FILE) as store:
        store.add_command("start", "A")
    return path


def test_a_bundle_installed_while_a_specimen_counts_is_taken_at_the_next_specimen(
        installed_config, tiny_bundle, renamed_bundle, monkeypatch):
    state = load_config(installed_config).state_dir()
    first, second = meta(tiny_bundle)["meta_sha256"], meta(renamed_bundle)["meta_sha256"]

    def finish_and_start_b(store):
        store.add_command("finish")
        store.add_command("start", "B")

    run_with_actions(installed_config, {3: lambda _: Models(state / "models").install(renamed_bundle),
                                        8: finish_and_start_b}, monkeypatch=monkeypatch)
    bundles = specimen_bundles(state)
    assert bundles == {"A": (first, first), "B": (second, second)}
    with Store(state / STATE_FILE) as store:
        a, b = store.specimen("A"), store.specimen("B")
        assert a.fields == 9 and b.fields > 0  # A counted frames 3 to 8 on its own bundle after the install
        assert Path(a.bundle.path).name.startswith("hematovision-tiny") and Path(b.bundle.path).is_dir()
    report = json.loads((state / "reports" / "B.json").read_text())
    assert report["model"]["name"] == "hematovision-tiny-v2"


def test_a_specimen_restarted_after_an_install_finishes_on_the_bundle_it_started_with(
        installed_config, tiny_bundle, renamed_bundle, monkeypatch):
    state = load_config(installed_config).state_dir()
    first, second = meta(tiny_bundle)["meta_sha256"], meta(renamed_bundle)["meta_sha256"]
    run_with_actions(installed_config, {2: lambda _: Models(state / "models").install(renamed_bundle)}, stop_at=5,
                     monkeypatch=monkeypatch)
    with Store(state / STATE_FILE) as store:
        assert store.open_specimen().specimen_id == "A"

    def finish_and_start_b(store):
        store.add_command("finish")
        store.add_command("start", "B")

    run_with_actions(installed_config, {9: finish_and_start_b}, monkeypatch=monkeypatch)
    assert specimen_bundles(state) == {"A": (first, first), "B": (second, second)}


# --- the running daemon, from its web page and a shell ------------------------------------------

def api(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(method, path, None if body is None else json.dumps(body),
                       {"Content-Type": "application/json"} if body is not None else {})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def test_the_running_daemon_keeps_signed_cells_and_counts_the_next_specimen_on_a_bundle_installed_meanwhile(
        tmp_path, tiny_bundle, renamed_bundle, samples_bccd):
    import signal
    import subprocess
    import sys

    from test_daemon import spawn, write_config
    from test_web_api import free_port
    from test_web_browser import _answers, wait_for

    port = free_port()
    config = write_config(tmp_path, Path(""), samples_bccd / "BCCD" / "JPEGImages", model={"bundle": ""},
                          source__replay={"fps": 20.0, "loop": True},
                          specimen={"id": "", "auto_start": False}, web={"enabled": True, "port": port})
    state = tmp_path / "state"
    Models(state / "models").install(tiny_bundle)
    process = spawn(config, tmp_path / "daemon.log")

    def counted(specimen_id: str) -> dict | None:
        status, entries = api(port, "GET", "/api/specimens")
        return next((e for e in entries if e["specimen_id"] == specimen_id and e["state"] == "preliminary"), None)

    try:
        wait_for("web page", lambda: _answers(f"http://127.0.0.1:{port}/api/status"), 60)
        assert api(port, "POST", "/api/specimen", {"action": "start", "specimen_id": "S-1", "target": 3})[0] == 200
        wait_for("S-1 counted", lambda: counted("S-1"), 60)
        shell = subprocess.run([sys.executable, "-m", "hematovision.edge.cli", "model", "install", str(renamed_bundle),
                                "--config", str(config)], capture_output=True, text=True, timeout=120)
        assert shell.returncode == 0, shell.stderr
        status, verified = api(port, "POST", "/api/specimens/S-1/sign", {"operator": "Ann"})
        assert status == 200 and verified["model"]["meta_sha256"] == meta(tiny_bundle)["meta_sha256"]
        records = state / "verified_cells" / "S-1" / "cells.json"
        wait_for("S-1's cells kept", records.is_file, 30)
        kept = json.loads(records.read_text())["cells"]
        assert len(kept) == len(verified["cells"]) and {c["operator"] for c in kept} == {"Ann"}
        assert api(port, "POST", "/api/specimen", {"action": "start", "specimen_id": "S-2", "target": 3})[0] == 200
        wait_for("S-2 counted", lambda: counted("S-2"), 60)
        second = api(port, "GET", "/api/specimens/S-2?thumbnails=0")[1]
        assert (second["model"]["name"], second["model"]["meta_sha256"]) == (
            "hematovision-tiny-v2", meta(renamed_bundle)["meta_sha256"])
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_a_damaged_installed_copy_is_copied_again_when_its_bundle_is_installed(tmp_path, tiny_bundle,
                                                                                reference_copy):
    state = tmp_path / "state"
    models = Models(state / "models")
    models.install(tiny_bundle)
    models.install(reference_copy)
    _flip_a_model_byte(state / "models" / "previous")  # the tiny bundle's installed copy
    change = models.install(tiny_bundle)
    assert change.current.meta_sha256 == meta(tiny_bundle)["meta_sha256"]
    assert (state / "models" / "current" / "model.tflite").read_bytes() == (tiny_bundle / "model.tflite").read_bytes()
    assert not [p for p in (state / "models" / "versions").iterdir() if p.name.startswith(".")]
