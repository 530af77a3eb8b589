"""The HTML report in a real browser (headless Chromium): on a 400 px phone and a 1280 px screen nothing is clipped."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from headless import CLIPPED, Browser, chromium
from hematovision.edge.reports.files import write_report_files
from hematovision.edge.reports.report import Report

pytestmark = pytest.mark.skipif(chromium() is None, reason="needs chromium (apt-get install chromium; .ci/run "
                                                             "installs it where it can)")
REPO = Path(__file__).resolve().parents[1]
WIDTHS = (400, 1280)


@pytest.fixture(scope="module")
def report_page(tmp_path_factory, tiny_bundle):
    """The report of the sample fields, counted for real, with the white count entered and a long id."""
    from hematovision.edge.cli import main as edge_main

    folder = tmp_path_factory.mktemp("page")
    assert edge_main(["count", "--model", str(tiny_bundle), "--wbc", "7.5", "--report", str(folder), "-q",
                      "--specimen-id", "S-2024-000123", str(REPO / "samples" / "bccd" / "BCCD" / "JPEGImages")]) == 0
    report = Report.from_dict(json.loads((folder / "S-2024-000123.json").read_text()))
    long_id = replace(report, specimen_id="HOSPITAL-WARD-7-" + "X" * 60)  # ids from a barcode can be long
    return write_report_files(long_id, folder)[2]


@pytest.mark.parametrize("width", WIDTHS)
def test_report_page_is_not_clipped_at_phone_and_desktop_width(report_page, width, tmp_path):
    with Browser(chromium()) as browser:
        session = browser.open(report_page.as_uri(), width)
        found = browser.evaluate(session, CLIPPED)
        shot = browser.screenshot(session, tmp_path / f"report-{width}.png")
    assert found["layout"] == width, f"the page is laid out {found['layout']} px wide on a {width} px screen"
    assert not found["clipped"], found["clipped"]
    assert shot.stat().st_size > 10_000


def test_report_page_prints_on_a4(report_page, tmp_path):
    import base64

    with Browser(chromium()) as browser:
        session = browser.open(report_page.as_uri(), 1280)
        pdf = base64.b64decode(browser.send("Page.printToPDF", session, preferCSSPageSize=True)["data"])
    (tmp_path / "report.pdf").write_bytes(pdf)
    sizes = {tuple(round(float(v)) for v in box.split()[2:]) for box in
             __import__("re").findall(rb"/MediaBox \[([^\]]*)\]", pdf) for box in [box.decode()]}
    assert sizes == {(595, 842)}, sizes  # A4 in points
