"""The device's web page in a real browser (headless Chromium): a barcode starts a replayed specimen, it counts to its
target, two cells are reclassified by keyboard, the report is signed, and the receiver gets the final results."""

from __future__ import annotations

import json
import signal
import time
import urllib.request
from pathlib import Path

import pytest

from headless import Browser, chromium
from hematovision.edge.links.astm import parse_message
from hematovision.edge.reports.files import safe_file_stem
from test_astm import PtyHost
from test_daemon import spawn, write_config
from test_web_api import free_port

pytestmark = pytest.mark.skipif(chromium() is None, reason="needs chromium (apt-get install chromium; .ci/run "
                                                             "installs it where it can)")
SPECIMEN = "S-2024/000123"  # a barcode with a slash: the page and the API take any id
TARGET = 6


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def wait_for(what: str, check, timeout_s: float = 90.0, every_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"no {what} within {timeout_s} s")


def type_keys(browser: Browser, session: str, text: str) -> None:
    """Keys as a USB barcode scanner sends them: one key per character, then Enter."""
    for ch in text:
        browser.send("Input.dispatchKeyEvent", session, type="keyDown", key=ch, text=ch)
        browser.send("Input.dispatchKeyEvent", session, type="keyUp", key=ch)
    press(browser, session, "Enter")


def press(browser: Browser, session: str, key: str) -> None:
    special = {"Enter": dict(code="Enter", windowsVirtualKeyCode=13, text="\r")}
    extra = special.get(key, dict(text=key))
    browser.send("Input.dispatchKeyEvent", session, type="keyDown", key=key, **extra)
    browser.send("Input.dispatchKeyEvent", session, type="keyUp", key=key, **{k: v for k, v in extra.items()
                                                                               if k != "text"})


@pytest.fixture
def device(tmp_path, tiny_bundle, samples_bccd):
    """A daemon replaying the sample fields in a loop, its web page on a free port, ASTM to a pty receiver."""
    port, tty = free_port(), tmp_path / "ttyLIS"
    with PtyHost() as host:
        tty.symlink_to(host.path)
        config = write_config(tmp_path, tiny_bundle, samples_bccd / "BCCD" / "JPEGImages",
                              source__replay={"fps": 8.0, "loop": True},
                              specimen={"id": "", "auto_start": False, "target": TARGET},
                              report={"link": "astm", "port": str(tty), "retry_s": 0.2, "reply_timeout_s": 2.0},
                              web={"enabled": True, "port": port})
        process = spawn(config, tmp_path / "daemon.log")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for("web page", lambda: _answers(url + "/api/status"), 60)
            yield url, host, tmp_path / "state"
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def _answers(url: str) -> bool:
    try:
        get(url)
    except OSError:
        return False
    return True


def test_a_scanned_specimen_counts_to_its_target_is_reviewed_by_keyboard_signed_and_sent_final(device, tmp_path):
    url, host, state = device
    with Browser(chromium()) as browser:
        live = browser.open(url + "/", 1280)
        browser.evaluate(live, "document.getElementById('specimen-input').focus()")
        type_keys(browser, live, SPECIMEN)  # the scanner's Enter submits the form
        wait_for("the specimen started", lambda: get(url + "/api/status")["specimen_id"] == SPECIMEN, 30)
        wait_for("the target", lambda: get(url + "/api/status")["state"] == "target reached")
        banner = wait_for("the target reached on the page", lambda: "Target reached" in browser.evaluate(
            live, "document.getElementById('banner').textContent") and browser.evaluate(
            live, "document.getElementById('banner').textContent"), 10)
        assert SPECIMEN in banner
        wait_for("the live frame shown", lambda: browser.evaluate(live, "document.getElementById('frame').naturalWidth")
                 > 0, 10)

        page = browser.open(f"{url}/review/{SPECIMEN}", 1280)
        wait_for("the gallery", lambda: browser.evaluate(page, "document.querySelectorAll('#gallery .cell').length"), 10)
        browser.evaluate(page, "document.getElementById('reviewer').value = 'Ada Lovelace'")
        before = get(f"{url}/api/specimens/{SPECIMEN.replace('/', '%2F')}?thumbnails=0")
        labels = {c["id"]: c["label"] for c in before["cells"]}
        changed = []
        for _ in range(2):  # the selected cell gets another class by its key; the next cell is selected
            cell = int(browser.evaluate(page, "document.querySelector('#gallery .cell.selected').dataset.cell"))
            new, key = ("monocyte", "m") if labels[cell] != "monocyte" else ("lymphocyte", "l")
            press(browser, page, key)
            wait_for("the cell shown in its new class", lambda: browser.evaluate(
                page, f"!!document.querySelector('#gallery section[data-class={new}] .cell[data-cell=\"{cell}\"]')"), 10)
            changed.append((cell, labels[cell], new))
        shown = browser.evaluate(page, "document.querySelector('#differential tr[data-class=monocyte] td.n').textContent")
        after = get(f"{url}/api/specimens/{SPECIMEN.replace('/', '%2F')}?thumbnails=0")
        assert int(shown) == {c["name"]: c["count"] for c in after["classes"]}["monocyte"]  # recomputed live
        assert [c for c in _pending(url)] == [{"cell": cell} for cell, _, _ in sorted(changed)]
        browser.evaluate(page, "document.getElementById('sign-button').click()")
        wait_for("the sign-off", lambda: "Verified by Ada Lovelace" in browser.evaluate(
            page, "document.getElementById('review-state').textContent"), 10)

    verified = get(f"{url}/api/specimens/{SPECIMEN.replace('/', '%2F')}?kind=verified&thumbnails=0")
    trail = verified["verification"]
    assert trail["operator"] == "Ada Lovelace"
    assert [(c["cell"], c["from"], c["to"], c["operator"]) for c in trail["changes"]] == [
        (cell, old, new, "Ada Lovelace") for cell, old, new in changed]
    stem = state / "reports" / safe_file_stem(SPECIMEN)
    preliminary = json.loads(wait_for("the preliminary file", lambda: _read(stem.with_name(stem.name + ".json"))))
    assert preliminary["verification"] == "preliminary: not verified"
    verified_file = wait_for("the verified file", lambda: _read(stem.with_name(stem.name + ".verified.json")))
    assert json.loads(verified_file)["verification"] == trail

    messages = wait_for("both ASTM messages", lambda: len(host.receiver.messages) >= 2 and host.receiver.messages, 60)
    first, second = (parse_message(m) for m in messages[:2])
    assert first.specimen_id == second.specimen_id == SPECIMEN
    assert {r.status for r in first.results.values()} == {"P"}
    statuses = {code: r.status for code, r in second.results.items()}
    assert set(statuses.values()) <= {"F", "C"} and "F" in statuses.values()
    for code, result in second.results.items():  # corrected exactly where the value changed
        assert (result.status == "C") == (result.value != first.results[code].value), code
    assert next(r for r in messages[1] if r.startswith("O|")).split("|")[25] in ("F", "C")
    assert next(r for r in messages[1] if r.startswith("R|")).split("|")[10] == "Ada Lovelace"


def _pending(url: str) -> list:
    """The changes made so far, as the current report's cells show them."""
    report = get(f"{url}/api/specimens/{SPECIMEN.replace('/', '%2F')}?thumbnails=0")
    first = get(f"{url}/api/specimens/{SPECIMEN.replace('/', '%2F')}?kind=preliminary&thumbnails=0")
    was = {c["id"]: c["label"] for c in first["cells"]}
    return [{"cell": c["id"]} for c in sorted(report["cells"], key=lambda c: c["id"]) if c["label"] != was[c["id"]]]


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def test_the_reports_list_and_the_live_page_fit_a_phone(device):
    url, _, _ = device
    from headless import CLIPPED

    with Browser(chromium()) as browser:
        for path in ("/", "/specimens"):
            session = browser.open(url + path, 400)
            found = browser.evaluate(session, CLIPPED)
            assert found["layout"] == 400 and not found["clipped"], (path, found["clipped"])
