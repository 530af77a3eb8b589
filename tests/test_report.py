"""Reports: schema, intervals, JSON/CSV/HTML files, safe file names, USB drive writing."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest

from hematovision.classes import KNOWN_CLASSES
from hematovision.edge.cli import format_table
from hematovision.edge.links.usb import (UsbReportLink, UsbSettings, choose_drive, parse_mounts,
                                        write_report_to_usb)
from hematovision.edge.reports.report import (PRELIMINARY, CellRecord, Flag, NrbcCount, RejectedCount, Report,
                                      ReportInvalid, build_classes, build_nrbc, clopper_pearson,
                                      commissioning_report)
from hematovision.edge.reports.files import safe_file_stem, write_report_files
from hematovision.edge.reports.html_page import render_html
from hematovision.edge.reports.schema import report_schema, unchecked_keywords, validate_report_dict
from hematovision.edge.counting.tally import Counter
from hematovision.errors import ConfigError, LinkFailed

HOSTILE_ID = '<script>alert("x")</script>&\'"/../../etc/x'


def _thumbnail(shade: int) -> str:
    image = np.full((24, 24, 3), shade, np.uint8)
    cv2.circle(image, (12, 12), 7, (200, 60, 160), -1)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode("ascii")


def sample_report(specimen_id: str = "S-2024-0001") -> Report:
    base = commissioning_report(specimen_id, "hv-pi-07",
                                datetime(2024, 5, 6, 9, 30, tzinfo=timezone.utc))
    cells = (CellRecord(1, "neutrophil", 0.97, _thumbnail(230), (10.0, 20.0)),
             CellRecord(2, "neutrophil", 0.41, _thumbnail(220), (11.0, 25.0)),
             CellRecord(3, "neutrophil", 0.78, None, (12.5, 30.0)),
             CellRecord(4, "lymphocyte", 0.88, _thumbnail(210), (40.0, 20.0)),
             CellRecord(5, "unidentified", 0.30, _thumbnail(200), (50.0, 60.0)))
    return replace(base, cells=cells, flags=(Flag.of("too_many_unidentified"), Flag.of("low_focus")))


# 50 neutrophils, 50 lymphocytes, 7 nucleated red cells, 3 platelets and 2 unidentified cells.
EIGHT_CLASS_LABELS = (["neutrophil"] * 50 + ["lymphocyte"] * 50 + ["erythroblast"] * 7 + ["platelet"] * 3
                      + ["unidentified"] * 2)


def eight_class_counter(labels=EIGHT_CLASS_LABELS) -> Counter:
    counter = Counter(KNOWN_CLASSES, target=100)
    for label in labels:
        counter.add(label)
    return counter


def eight_class_report(specimen_id: str = "S-2024-0002") -> Report:
    """The report of eight_class_counter() as reports.build makes it, one gallery cell per count."""
    tally = eight_class_counter().tally()
    cells = tuple(CellRecord(i + 1, label, 0.9 - 0.001 * i, _thumbnail(200 + i % 50), (float(i), 5.0))
                  for i, label in enumerate(EIGHT_CLASS_LABELS))
    base = commissioning_report(specimen_id, "hv-pi-07", datetime(2024, 5, 6, 9, 30, tzinfo=timezone.utc))
    return replace(base, classes=build_classes({c.name: c.count for c in tally.classes}),
                   nrbc=build_nrbc(tally.nrbc.count, tally.identified), rejected=tally.rejected,
                   unidentified=tally.unidentified, total=tally.total, target_reached=tally.target_reached,
                   flags=(), cells=cells)


def test_report_round_trips_through_its_dict():
    report = sample_report()
    assert Report.from_dict(report.to_dict()) == report
    assert Report.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def test_report_json_file_validates_against_the_schema(tmp_path):
    paths = write_report_files(sample_report(), tmp_path)
    data = json.loads(paths[0].read_text("utf-8"))
    validate_report_dict(data)
    assert data["schema"] == "hematovision.report/1"


def test_schema_file_is_valid_json_schema_per_the_jsonschema_package(tmp_path):
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is an optional check")
    jsonschema.Draft202012Validator.check_schema(report_schema())
    jsonschema.validate(sample_report().to_dict(), report_schema())


@pytest.mark.parametrize("change, words", [
    (lambda d: d.pop("total"), "missing total"),
    (lambda d: d.update(unidentified=True), "integer"),
    (lambda d: d.update(total=999), "total 999"),
    (lambda d: d.update(verification="verified"), "verification"),
    (lambda d: d.update(specimen_id="a\nb"), "specimen_id"),
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d["classes"][0].update(percent=float("nan")), "percent"),
    (lambda d: d["classes"][0].update(ci95=[70.0, 80.0]), "ci95"),
    (lambda d: d["cells"][0].update(thumbnail='data:image/jpeg;base64,"><img src=x>'),
     "thumbnail"),
    (lambda d: d["cells"][0].update(label="platelet"), "platelet"),
    (lambda d: d.update(finished_at="2024-05-06T09:00:00+00:00"), "before"),
    (lambda d: d.update(started_at="2024-05-06 09:00"), "started_at"),
])
def test_from_dict_refuses_a_report_that_breaks_the_schema_or_its_sums(change, words):
    data = sample_report().to_dict()
    change(data)
    with pytest.raises(ReportInvalid, match=re.escape(words)):
        Report.from_dict(data)


def test_eight_class_report_validates_against_the_schema_and_round_trips(tmp_path):
    report = eight_class_report()
    data = json.loads(write_report_files(report, tmp_path)[0].read_text("utf-8"))
    validate_report_dict(data)
    assert data["nrbc"] == {"count": 7, "per_100_wbc": 7.0}
    assert data["rejected"] == [{"name": "platelet", "count": 3}]
    assert [c["name"] for c in data["classes"]] == ["neutrophil", "lymphocyte", "monocyte", "eosinophil",
                                                    "basophil", "ig"]
    assert data["total"] == 112 == len(data["cells"]) and data["target_reached"]
    assert Report.from_dict(data) == report
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is an optional check")
    jsonschema.validate(data, report_schema())


def test_a_report_without_nrbc_or_rejected_keys_still_loads():
    data = sample_report().to_dict()  # a four-class report, exactly as written before NRBC existed
    assert "nrbc" not in data and "rejected" not in data
    report = Report.from_dict(data)
    assert report.nrbc is None and report.rejected == () and report.to_dict() == data


def test_schema_uses_only_keywords_the_validator_checks():
    assert unchecked_keywords(report_schema()) == []
    assert unchecked_keywords({"properties": {"a": {"patternProperties": {}}}}) == ["$.a.patternProperties"]


@pytest.mark.parametrize("change, words", [
    (lambda d: d["nrbc"].update(per_100_wbc=70.0), "per_100_wbc 70.0 is not 7 per 100"),
    (lambda d: d["nrbc"].update(per_100_wbc=None), "null exactly when"),
    (lambda d: d["nrbc"].update(count=8), "nrbc (8)"),
    (lambda d: d["rejected"][0].update(count=-1), "minimum"),
    (lambda d: d["rejected"][0].update(name="neutrophil"), "repeat a name"),
    (lambda d: (d.pop("nrbc"), d.update(total=105)), "erythroblast"),  # cells left without a count
    (lambda d: d.update(nrbc={"count": 7}), "missing per_100_wbc"),
])
def test_from_dict_refuses_nrbc_or_rejected_counts_that_break_the_schema_or_the_sums(change, words):
    data = eight_class_report().to_dict()
    change(data)
    with pytest.raises(ReportInvalid, match=re.escape(words)):
        Report.from_dict(data)


def test_clopper_pearson_gives_the_exact_binomial_interval():
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(0.308497, abs=1e-6))
    lo, hi = clopper_pearson(5, 10)
    assert (lo, hi) == (pytest.approx(0.187086, abs=1e-6), pytest.approx(0.812914, abs=1e-6))
    assert clopper_pearson(0, 0) == (0.0, 1.0)


def test_clopper_pearson_matches_scipy_over_many_counts():
    stats = pytest.importorskip("scipy.stats", reason="scipy is only a cross-check")
    for n in (1, 7, 100, 400, 5000):
        for k in sorted({0, 1, n // 3, n - 1, n}):
            lo, hi = clopper_pearson(k, n)
            assert lo == pytest.approx(stats.beta.ppf(0.025, k, n - k + 1) if k else 0, abs=1e-9)
            assert hi == pytest.approx(stats.beta.ppf(0.975, k + 1, n - k) if k < n else 1,
                                       abs=1e-9)


def test_build_classes_gives_percent_of_identified_inside_its_interval():
    classes = build_classes({"neutrophil": 60, "lymphocyte": 40, "monocyte": 0})
    assert [c.percent for c in classes] == [60.0, 40.0, 0.0]
    assert all(c.ci95[0] <= c.percent <= c.ci95[1] for c in classes)
    assert classes[2].ci95[0] == 0.0


def test_counter_keeps_nrbc_and_rejected_cells_out_of_the_differential_and_the_target():
    tally = eight_class_counter().tally()
    percent = {c.name: c.percent for c in tally.classes}
    assert percent == {"neutrophil": 50.0, "lymphocyte": 50.0, "monocyte": 0.0, "eosinophil": 0.0,
                       "basophil": 0.0, "ig": 0.0}
    assert tally.nrbc == NrbcCount(7, 7.0) and tally.rejected == (RejectedCount("platelet", 3),)
    assert (tally.identified, tally.unidentified, tally.total) == (100, 2, 112)
    assert tally.target_reached
    summary = tally.to_dict()
    assert summary["nrbc"] == {"count": 7, "per_100_wbc": 7.0}
    assert summary["rejected"] == [{"name": "platelet", "count": 3}]


def test_target_is_not_reached_by_nrbc_or_rejected_cells():
    tally = eight_class_counter(["neutrophil"] * 99 + ["erythroblast"] * 30 + ["platelet"] * 30).tally()
    assert tally.identified == 99 and not tally.target_reached
    assert tally.nrbc.per_100_wbc == pytest.approx(100 * 30 / 99)


def test_nrbc_per_100_wbc_is_null_while_no_white_cell_is_identified():
    tally = eight_class_counter(["erythroblast"] * 3).tally()
    assert tally.nrbc == NrbcCount(3, None) and tally.to_dict()["nrbc"] == {"count": 3, "per_100_wbc": None}
    assert "3   n/a per 100 WBC" in format_table({**tally.to_dict(), "fields": 1, "skipped_files": []})


def test_counter_of_a_four_class_model_has_no_nrbc_or_rejected_keys():
    counter = Counter(("neutrophil", "lymphocyte", "monocyte", "eosinophil"))
    for label in ["neutrophil"] * 3 + ["unidentified"]:
        counter.add(label)
    summary = counter.tally().to_dict()
    assert set(summary) == {"classes", "unidentified", "identified", "total", "target", "target_reached"}
    assert (summary["identified"], summary["total"]) == (3, 4)


def test_csv_lists_nrbc_and_rejected_cells_apart_from_the_differential(tmp_path):
    csv_path = write_report_files(eight_class_report(), tmp_path)[1]
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text("utf-8-sig"))))
    assert [(r["class"], r["role"]) for r in rows[6:]] == [
        ("unidentified", "unidentified"), ("erythroblast", "per_100_wbc"), ("platelet", "reject"),
        ("total", "total")]
    assert {r["role"] for r in rows[:6]} == {"differential"}
    nrbc = rows[7]
    assert (nrbc["count"], nrbc["per_100_wbc"], nrbc["percent_of_identified"]) == ("7", "7.00", "")
    assert (rows[8]["count"], rows[8]["percent_of_identified"]) == ("3", "")
    assert int(rows[-1]["count"]) == 112


def test_csv_has_one_row_per_class_then_unidentified_and_total(tmp_path):
    report = sample_report()
    csv_path = write_report_files(report, tmp_path)[1]
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text("utf-8-sig"))))
    assert [r["class"] for r in rows] == [c.name for c in report.classes] + [
        "unidentified", "total"]
    assert [int(r["count"]) for r in rows[:-2]] == [c.count for c in report.classes]
    assert int(rows[-1]["count"]) == report.total
    assert float(rows[0]["ci95_low_percent"]) == report.classes[0].ci95[0]


def test_csv_keeps_a_formula_like_specimen_id_as_text(tmp_path):
    csv_path = write_report_files(sample_report("=HYPERLINK(1)"), tmp_path)[1]
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text("utf-8-sig"))))
    assert {r["specimen_id"] for r in rows} == {"'=HYPERLINK(1)"}


def test_html_lists_every_class_and_escapes_a_hostile_specimen_id():
    report = sample_report(HOSTILE_ID)
    page = render_html(report)
    for c in report.classes:
        assert f"<td>{c.name}</td>" in page
        assert f">{c.name}</text>" in page  # the bar chart label
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#x27;&quot;" in page


def test_html_shows_nrbc_and_rejected_beside_the_differential_and_keeps_them_out_of_the_chart():
    page = render_html(eight_class_report())
    results = page.split('id="results"')[1].split("</table>")[0]
    beside = page.split('id="beside"')[1].split("</table>")[0]
    chart = page.split("<svg")[1].split("</svg>")[0]
    assert "erythroblast" not in results and "platelet" not in results
    assert "NRBC (nucleated red cells, erythroblast)" in beside and "7.0 per 100 WBC" in beside
    assert "platelet: not white cells (rejected)" in beside
    assert "erythroblast" not in chart and "platelet" not in chart and ">neutrophil</text>" in chart
    assert page.index('id="results"') < page.index('id="beside"') < page.index("<svg")


def test_html_gallery_shows_every_counted_cell_nrbc_and_rejected_ones_included():
    page = render_html(eight_class_report())
    assert page.count("data:image/jpeg;base64,") == 112
    for name, n in (("neutrophil", 50), ("lymphocyte", 50), ("erythroblast", 7), ("platelet", 3),
                    ("unidentified", 2)):
        group = page.split(f'data-class="{name}"')[1].split("</div>")[0]
        assert group.count("<figure") == n
    assert "erythroblast: NRBC, not in the differential (7)" in page
    assert "platelet: not a white cell (rejected) (3)" in page


def test_html_of_a_four_class_report_has_no_beside_table():
    page = render_html(sample_report())
    assert 'id="beside"' not in page and "<th>total</th>" in page


def test_html_is_self_contained_with_no_external_urls():
    page = render_html(sample_report())
    assert not re.search(r"(?i)(https?:|<script|<link|<iframe|@import|url\()", page)
    sources = re.findall(r'(?i)(?:src|href|xlink:href)\s*=\s*"([^"]*)"', page)
    images = [s for s in sources if not re.fullmatch(r"#cell-\d+", s)]  # links within the page: enlarge a cell
    assert len(images) == 4 and all(s.startswith("data:image/jpeg;base64,") for s in images)
    assert len(sources) - len(images) == 5 and "img-src data:" in page


def test_html_gallery_puts_the_lowest_confidence_first_inside_each_class():
    page = render_html(sample_report())
    neutrophils = page.split('data-class="neutrophil"')[1].split("</div>")[0]
    assert re.findall(r"#(\d+) ", neutrophils) == ["2", "3", "1"]
    assert 'data-class="unidentified"' in page


def test_html_shows_the_verification_status_prominently():
    report = sample_report()
    assert 'class="banner preliminary"' in render_html(report)
    verified = report.with_verification("Dr <b>Ada</b>", datetime(2024, 5, 6, 11, 0))
    page = render_html(verified)
    assert 'class="banner verified"' in page and "Dr &lt;b&gt;Ada&lt;/b&gt;" in page
    assert verified.verified and not report.verified and report.verification == PRELIMINARY


def test_a_specimen_id_with_dot_dot_cannot_leave_the_folder(tmp_path):
    folder = tmp_path / "out"
    paths = write_report_files(sample_report("../../etc/x"), folder)
    assert all(p.parent == folder for p in paths)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_safe_file_stem_keeps_plain_ids_and_separates_lookalikes():
    assert safe_file_stem("S-2024_0001.a") == "S-2024_0001.a"
    assert safe_file_stem("a/b") != safe_file_stem("a_b")
    for hostile in ("..", ".", "../x", "/etc/passwd", "a\x00b", "测试", "." * 300):
        stem = safe_file_stem(hostile)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", stem) and len(stem) < 100


def test_an_inconsistent_report_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ReportInvalid, match="total"):
        write_report_files(replace(sample_report(), total=7), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_specimen_id_is_refused(tmp_path):
    with pytest.raises(ReportInvalid, match="empty"):
        write_report_files(sample_report("   "), tmp_path)


def test_a_symlinked_target_folder_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(LinkFailed, match="symlink"):
        write_report_files(sample_report(), tmp_path / "link")
    with pytest.raises(LinkFailed, match="symlink"):
        write_report_files(sample_report(), tmp_path / "link" / "sub")
    assert list(real.iterdir()) == []


def test_a_symlink_at_a_report_file_name_is_not_followed(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "S-1.json").symlink_to(outside)
    with pytest.raises(LinkFailed, match="symlink"):
        write_report_files(sample_report("S-1"), folder)
    assert outside.read_text() == "keep me"


def test_writing_again_replaces_the_files_and_leaves_no_temporary_files(tmp_path):
    write_report_files(replace(sample_report(), device_id="first"), tmp_path)
    paths = write_report_files(sample_report(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths)
    assert '"device_id": "hv-pi-07"' in paths[0].read_text("utf-8")


def test_a_verified_report_is_written_beside_the_preliminary_one_which_is_kept(tmp_path):
    preliminary = write_report_files(sample_report(), tmp_path)
    before = [p.read_bytes() for p in preliminary]
    verified = sample_report().with_verification("Ada", datetime(2024, 5, 6, 11, 0))
    paths = write_report_files(verified, tmp_path)
    assert [p.name for p in paths] == ["S-2024-0001.verified.json", "S-2024-0001.verified.csv",
                                       "S-2024-0001.verified.html"]
    assert [p.read_bytes() for p in preliminary] == before
    assert json.loads(paths[0].read_text("utf-8"))["verification"]["operator"] == "Ada"
    assert "verified by Ada" in paths[1].read_text("utf-8-sig") and "verified by Ada" in paths[2].read_text()


def test_an_id_ending_in_verified_never_takes_the_name_of_another_ids_verified_files():
    assert safe_file_stem("S-1.verified") != safe_file_stem("S-1") + ".verified"


def _mounts_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mounts"
    path.write_text("\n".join(["/dev/mmcblk0p2 / ext4 rw,noatime 0 0", *lines]) + "\n")
    return path


def test_usb_writes_the_report_files_onto_the_configured_mounted_drive(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    mounts = _mounts_file(tmp_path, f"/dev/sda1 {drive} vfat rw,relatime 0 0")
    paths = write_report_to_usb(sample_report(), UsbSettings(drive, mounts_file=mounts))
    assert [p.parent for p in paths] == [drive / "hematovision"] * 3
    assert all(p.is_file() for p in paths)


def test_usb_report_link_reports_what_it_wrote(tmp_path):
    mounts = _mounts_file(tmp_path, f"/dev/sda1 {tmp_path} vfat rw 0 0")
    result = UsbReportLink(UsbSettings(tmp_path, "reports", mounts)).send(sample_report())
    assert (result.link, result.port, result.frames_sent) == ("usb", str(tmp_path / "reports"), 3)


def test_usb_refuses_a_mount_point_with_no_drive_mounted(tmp_path):
    (tmp_path / "drive").mkdir()
    settings = UsbSettings(tmp_path / "drive", mounts_file=_mounts_file(tmp_path))
    with pytest.raises(LinkFailed, match="no drive is mounted"):
        write_report_to_usb(sample_report(), settings)
    assert list((tmp_path / "drive").iterdir()) == []


def test_usb_finds_the_one_drive_under_media_and_refuses_several(tmp_path):
    media = tmp_path / "media"
    settings = UsbSettings(media_roots=(media,))
    one = parse_mounts(f"/dev/sda1 {media}/pi/KINGSTON\\040USB vfat rw 0 0\n")
    assert choose_drive(one, settings) == media / "pi" / "KINGSTON USB"
    two = one + parse_mounts(f"/dev/sdb1 {media}/pi/OTHER exfat rw 0 0\n")
    with pytest.raises(LinkFailed, match="several drives"):
        choose_drive(two, settings)
    with pytest.raises(LinkFailed, match="no USB drive"):
        choose_drive(parse_mounts("/dev/root / ext4 rw 0 0\n"), settings)


def test_usb_refuses_a_read_only_drive_and_a_bad_subfolder(tmp_path):
    mounts = parse_mounts(f"/dev/sda1 {tmp_path} vfat ro,relatime 0 0\n")
    with pytest.raises(LinkFailed, match="read-only"):
        choose_drive(mounts, UsbSettings(tmp_path))
    with pytest.raises(ConfigError, match="subfolder"):
        write_report_to_usb(sample_report(), UsbSettings(tmp_path, subfolder="../x"))


def test_usb_refuses_a_symlinked_drive_folder(tmp_path):
    drive = tmp_path / "drive"
    drive.mkdir()
    (drive / "hematovision").symlink_to(tmp_path)
    mounts = _mounts_file(tmp_path, f"/dev/sda1 {drive} vfat rw 0 0")
    with pytest.raises(LinkFailed, match="symlink"):
        write_report_to_usb(sample_report(), UsbSettings(drive, mounts_file=mounts))


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="needs chromium (apt-get install chromium)")
def test_html_renders_in_headless_chromium_with_every_class_visible(tmp_path):
    html_path = write_report_files(sample_report(HOSTILE_ID), tmp_path)[2]
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
               "--enable-logging=stderr", "--v=0", "--dump-dom", html_path.as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"):
        assert f"<td>{name}</td>" in done.stdout
    assert "<script>" not in done.stdout
    assert "CONSOLE" not in done.stderr and "Refused to" not in done.stderr


# --- verification thumbnails --------------------------------------------------------------

def _field_with_a_cell_at_the_left_border() -> np.ndarray:
    image = np.zeros((480, 640, 3), np.uint8)
    image[:] = (230, 200, 210)  # the smear's pale background
    cv2.circle(image, (10, 240), 20, (120, 40, 140), -1)  # a stained cell cut by the field's left edge
    return image


def _decoded(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def test_thumbnail_of_a_cell_at_the_field_border_shows_no_mirrored_twin_but_grey_and_the_cut_edge():
    from hematovision.crop import CropGeometry
    from hematovision.edge.vision.pipeline import CUT_EDGE_RGB, THUMBNAIL_FILL_RGB, THUMBNAIL_PX, cell_thumbnails

    (jpeg,) = cell_thumbnails(_field_with_a_cell_at_the_left_border(), [(60.0, 240.0)], 0.1, CropGeometry(24.0, 224))
    thumb = _decoded(jpeg).astype(int)
    assert thumb.shape == (THUMBNAIL_PX, THUMBNAIL_PX, 3)
    edge = round(60 / 240 * THUMBNAIL_PX)  # the field's edge: 60 of the crop's 240 pixels lie outside
    outside = thumb[:, : edge - 6]
    assert np.abs(outside - THUMBNAIL_FILL_RGB).max() <= 12  # neutral grey: no second, mirrored cell
    line = thumb[20:-20, edge + 1: edge + 3]  # drawn just inside the field
    red, green, blue = line.mean(axis=(0, 1))
    assert red > 220 and 140 < green < 210 and blue < 90 and CUT_EDGE_RGB[0] > CUT_EDGE_RGB[2]  # marked in orange
    cell_row = thumb[THUMBNAIL_PX // 2, edge + 6: edge + 20]
    assert cell_row.mean(axis=0)[1] < 90  # the real half cell is there, inside the field


def test_thumbnail_of_a_cell_inside_the_field_is_the_plain_crop_larger_than_before():
    from hematovision.crop import CropGeometry, cut_crop
    from hematovision.edge.vision.pipeline import cell_thumbnails

    image = _field_with_a_cell_at_the_left_border()
    cv2.circle(image, (320, 240), 30, (120, 40, 140), -1)
    (jpeg,) = cell_thumbnails(image, [(320.0, 240.0)], 0.1, CropGeometry(24.0, 224))
    thumb = _decoded(jpeg).astype(int)
    assert thumb.shape[0] >= 160
    assert np.abs(thumb - cut_crop(image, (320.0, 240.0), 0.1, CropGeometry(24.0, 224))).mean() < 3


# --- the page on a phone, on paper, in local time, with absolute counts --------------------

def test_html_has_a_viewport_a_fluid_chart_and_an_a4_print_stylesheet():
    page = render_html(sample_report())
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    svg = re.search(r"<svg[^>]*>", page).group(0)
    assert "viewBox" in svg and "width=" not in svg  # scales with the page, no fixed 530 px
    assert "@page{size:A4" in page and "@media print{" in page


def test_html_shows_times_in_local_time_with_the_offset(monkeypatch):
    import time

    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        page = render_html(sample_report())  # started and finished 2024-05-06 09:30 UTC
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert "<th>Started</th><td>2024-05-06 11:30:00 (UTC+02:00)</td>" in page
    assert "<th>Finished</th><td>2024-05-06 11:30:00 (UTC+02:00)</td>" in page


def test_html_and_csv_show_absolute_counts_when_the_white_count_was_entered(tmp_path):
    report = replace(sample_report(), wbc_10e9_per_l=6.5)
    assert Report.from_dict(report.to_dict()) == report
    page = render_html(report)
    neutrophil = report.classes[0]
    assert '<th title="absolute count">x10^9/L</th>' in page and "the absolute count" in page
    assert f'<td class="n absolute">{6.5 * neutrophil.percent / 100:.2f}</td>' in page
    assert "6.5 x10^9/L (entered by the operator)" in page
    rows = list(csv.reader(io.StringIO(write_report_files(report, tmp_path)[1].read_text("utf-8-sig"))))
    column = rows[0].index("absolute_10e9_per_l")
    assert column == 9 and rows[1][column] == f"{6.5 * neutrophil.percent / 100:.3f}"
    assert "absolute" not in render_html(sample_report())


def test_html_gallery_cells_enlarge_on_selection_and_name_their_field():
    cells = tuple(replace(c, field=f"BloodImage_{c.id:05d}.jpg") for c in sample_report().cells)
    page = render_html(replace(sample_report(), cells=cells))
    assert '<figure id="cell-1"' in page and '<a href="#cell-1">' in page
    assert "figure:target img{" in page
    assert '<span class="field">BloodImage_00001.jpg</span>' in page


def test_a_report_with_a_white_count_out_of_range_or_a_bad_field_name_is_refused():
    data = sample_report().to_dict()
    with pytest.raises(ReportInvalid, match="wbc_10e9_per_l"):
        Report.from_dict({**data, "wbc_10e9_per_l": 7500})
    cells = [{**data["cells"][0], "field": "a\nb"}]
    with pytest.raises(ReportInvalid, match="field"):
        Report.from_dict({**data, "cells": cells})
