"""`hematovision-edge classify` and `count`: the output contract scripts rely on, and bad input."""

import json
import shutil

import cv2
import numpy as np
import pytest

from hematovision.classes import KNOWN_CLASSES, UNIDENTIFIED
from hematovision.crop import DEFAULT_GEOMETRY
from hematovision.edge.cli import format_table
from hematovision.edge.cli import main as edge_main
from hematovision.edge.reports.report import Report
from hematovision.edge.counting.tally import Counter

FIELDS = "BCCD/JPEGImages"


def _lines(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


@pytest.fixture()
def crops(tmp_path, samples_bccd):
    """Two real cell crops cut around annotated white cells."""
    from hematovision.train.batches import crops_array
    from hematovision.train.datasets import load_bccd

    samples = load_bccd(samples_bccd).samples[:2]
    paths = []
    for i, crop in enumerate(crops_array(samples, DEFAULT_GEOMETRY)):
        paths.append(tmp_path / f"cell{i}.png")
        cv2.imwrite(str(paths[-1]), crop[:, :, ::-1])
    return paths


def test_classify_json_gives_one_object_per_crop(tiny_bundle, crops, capsys):
    assert edge_main(["classify", "--model", str(tiny_bundle), "--json", *map(str, crops)]) == 0
    rows = _lines(capsys)
    assert [r["path"] for r in rows] == [str(p) for p in crops]
    for r in rows:
        assert set(r) == {"path", "label", "confidence", "probabilities", "novelty", "unfamiliar", "cell"}
        assert r["label"] in set(r["probabilities"]) | {UNIDENTIFIED} and r["label"] == r["label"].lower()
        assert abs(sum(r["probabilities"].values()) - 1) < 1e-3 and 0 <= r["confidence"] <= 1
        assert r["cell"]["scale_source"] in ("red cells", "assumed") and r["cell"]["um_per_pixel"] > 0


def test_classify_takes_the_given_pixel_size_and_says_so(tiny_bundle, crops, capsys):
    um = DEFAULT_GEOMETRY.side_um / DEFAULT_GEOMETRY.input_size  # the crops were cut at this scale
    assert edge_main(["classify", "--model", str(tiny_bundle), "--json", "--um-per-pixel", str(um), str(crops[0])]) == 0
    cell = _lines(capsys)[0]["cell"]
    assert cell["scale_source"] == "given" and cell["um_per_pixel"] == pytest.approx(um, rel=1e-4)
    x0, y0, x1, y1 = cell["bbox"]
    assert x0 < 112 < x1 and y0 < 112 < y1  # the cell the crop was cut around


def test_classify_reports_an_image_without_a_white_cell_and_goes_on(tiny_bundle, crops, samples_bccd, tmp_path, capsys):
    empty = tmp_path / "no_cell.png"  # a corner of a real field, away from its one white cell
    cv2.imwrite(str(empty), cv2.imread(str(samples_bccd / FIELDS / "BloodImage_00000.jpg"))[:240, :260])
    assert edge_main(["classify", "--model", str(tiny_bundle), "--json", str(empty), str(crops[0])]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows[0] == {"path": str(empty), "error": rows[0]["error"]} and "no white cell found" in rows[0]["error"]
    assert rows[1]["path"] == str(crops[0]) and "label" in rows[1]
    assert "1 of 2 images classified, 1 skipped" in captured.err
    assert edge_main(["classify", "--model", str(tiny_bundle), str(empty)]) == 1


@pytest.mark.shared_data
def test_classify_measures_a_second_labs_scale_from_its_red_cells(tiny_bundle, shared_data, capsys):
    images = sorted((shared_data / "pbc" / "lymphocyte").glob("*.jpg"))[:3]
    assert edge_main(["classify", "--model", str(tiny_bundle), "--json", *map(str, images)]) == 0
    for row in _lines(capsys):
        assert row["cell"]["scale_source"] == "red cells" and 0.08 < row["cell"]["um_per_pixel"] < 0.12


def test_count_json_lists_cells_per_field_then_a_summary(tiny_bundle, samples_bccd, capsys):
    fields = sorted((samples_bccd / FIELDS).glob("*.jpg"))[:6]
    assert edge_main(["count", "--model", str(tiny_bundle), "--json", *map(str, fields)]) == 0
    rows = _lines(capsys)
    assert [r["path"] for r in rows[:-1]] == [str(f) for f in fields]
    for r in rows[:-1]:
        assert (r["width"], r["height"]) == (640, 480)
        for cell in r["cells"]:
            x0, y0, x1, y1 = cell["bbox"]
            assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
            assert set(cell) == {"bbox", "label", "confidence", "novelty", "unfamiliar"}
    summary = rows[-1]["summary"]
    counted = sum(len(r["cells"]) for r in rows[:-1])
    assert summary["total"] == counted >= 2 and summary["fields"] == 6
    assert sum(c["count"] for c in summary["classes"]) + summary["unidentified"] == counted
    assert "nrbc" not in summary and "rejected" not in summary  # a four-class bundle: as before


def test_count_table_and_reports_from_the_sample_folder(tiny_bundle, samples_bccd, tmp_path, capsys):
    assert edge_main(["count", "--model", str(tiny_bundle), str(samples_bccd / FIELDS),
                      "--report", str(tmp_path / "rep"), "--specimen-id", "S-001"]) == 0
    out = capsys.readouterr().out
    assert "Differential:" in out and "neutrophil" in out and "95% CI" in out
    report = json.loads((tmp_path / "rep" / "S-001.json").read_text())
    assert report["specimen_id"] == "S-001" and report["verification"] == "preliminary: not verified"
    assert len(report["cells"]) == report["total"] > 20
    assert (tmp_path / "rep" / "S-001.html").read_text().count("data:image/jpeg;base64,") == report["total"]


def test_table_shows_nrbc_per_100_wbc_and_rejected_cells_below_the_differential():
    counter = Counter(KNOWN_CLASSES)
    for label, n in (("neutrophil", 50), ("lymphocyte", 50), ("erythroblast", 7), ("platelet", 3),
                     (UNIDENTIFIED, 2)):
        for _ in range(n):
            counter.add(label)
    lines = format_table({**counter.tally().to_dict(), "fields": 3, "skipped_files": []}).splitlines()
    assert lines[0] == "Differential: 100 cells identified, 2 unidentified; 3 fields; target 100 reached"
    assert lines[2].split() == ["neutrophil", "50", "50.0", "39.8", "-", "60.2"]
    assert [line.split()[0] for line in lines[2:8]] == list(KNOWN_CLASSES[:6])
    assert lines[8].split() == ["unidentified", "2"]
    assert lines[9].startswith("NRBC") and "7   7.0 per 100 WBC" in lines[9] and "not in the 100%" in lines[9]
    assert lines[10] == "not white cells (rejected): platelet 3"


def test_count_with_a_bundle_naming_erythroblast_and_platelet_keeps_them_out_of_the_differential(
        nrbc_bundle, samples_bccd, tmp_path, capsys):
    args = ["count", "--model", str(nrbc_bundle), str(samples_bccd / FIELDS), "--specimen-id", "S-8"]
    assert edge_main([*args, "--json", "--report", str(tmp_path / "rep")]) == 0
    rows = _lines(capsys)
    labels = [c["label"] for r in rows[:-1] for c in r["cells"]]
    summary = rows[-1]["summary"]
    assert [c["name"] for c in summary["classes"]] == ["neutrophil", "lymphocyte"]
    assert summary["identified"] == labels.count("neutrophil") + labels.count("lymphocyte") > 0
    assert summary["nrbc"]["count"] == labels.count("erythroblast")
    assert summary["nrbc"]["per_100_wbc"] == round(100 * labels.count("erythroblast") / summary["identified"], 2)
    assert summary["rejected"] == [{"name": "platelet", "count": labels.count("platelet")}]
    assert summary["total"] == len(labels)
    report = Report.from_dict(json.loads((tmp_path / "rep" / "S-8.json").read_text()))
    assert report.nrbc.count == summary["nrbc"]["count"] and report.rejected[0].name == "platelet"
    assert 'id="beside"' in (tmp_path / "rep" / "S-8.html").read_text()
    assert edge_main(args) == 0
    table = capsys.readouterr().out
    assert "\nNRBC " in table and "not white cells (rejected): platelet" in table


def test_unreadable_field_is_skipped_and_listed(tiny_bundle, samples_bccd, tmp_path, capsys):
    folder = tmp_path / "fields"
    folder.mkdir()
    good = sorted((samples_bccd / FIELDS).glob("*.jpg"))[0]
    shutil.copy(good, folder / "a.jpg")
    (folder / "b.jpg").write_bytes(good.read_bytes()[:500])
    cv2.imwrite(str(folder / "c.png"), np.full((480, 640), 200, np.uint8))  # grayscale
    assert edge_main(["count", "--model", str(tiny_bundle), "--json", str(folder)]) == 0
    summary = _lines(capsys)[-1]["summary"]
    skipped = {s["path"].rsplit("/", 1)[-1]: s["reason"] for s in summary["skipped_files"]}
    assert "b.jpg" in skipped and "truncated" in skipped["b.jpg"]
    assert summary["fields"] == 2


def test_empty_field_gives_zero_cells(tiny_bundle, samples_bccd, tmp_path, capsys):
    field = cv2.imread(str(sorted((samples_bccd / FIELDS).glob("*.jpg"))[0]))
    blank = np.full_like(field, 235)
    cv2.imwrite(str(tmp_path / "blank.png"), blank)
    code = edge_main(["count", "--model", str(tiny_bundle), "--json", str(tmp_path / "blank.png")])
    summary = _lines(capsys)[-1]["summary"]
    assert code == 0 and summary["total"] == 0


def test_folder_without_images_is_an_error(tiny_bundle, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert edge_main(["count", "--model", str(tiny_bundle), str(tmp_path / "empty")]) == 1
    assert "folder has no images" in capsys.readouterr().err


def test_missing_model_names_the_bundle(tmp_path, crops, capsys):
    assert edge_main(["classify", "--model", str(tmp_path / "nope"), str(crops[0])]) == 1
    assert "bundle.json: missing" in capsys.readouterr().err


def test_scan_counts_each_white_cell_of_a_simulated_pan_once(tiny_bundle, samples_bccd, tmp_path, capsys):
    from hematovision.edge.counting import scansim

    settings = scansim.ScanSettings(columns=4, rows=2, detours=2, seed=5)
    slide = scansim.build_slide(scansim.field_paths(samples_bccd, 8), settings)
    frames = list(scansim.scan(slide, settings))
    folder = scansim.write_scan(frames, tmp_path / "scan", slide)
    assert edge_main(["count", "--model", str(tiny_bundle), "--scan", "--json", str(folder)]) == 0
    rows = _lines(capsys)
    origin = {f"frame_{f.index:04d}.png": f.origin for f in frames}
    counted = [(origin[r["path"].rsplit("/", 1)[-1]], ((c["bbox"][0] + c["bbox"][2]) / 2, (c["bbox"][1] + c["bbox"][3]) / 2))
               for r in rows[:-1] for c in r["cells"]]
    result = scansim.score(slide, frames, counted)
    summary = rows[-1]["summary"]
    assert result.doubles == 0 and result.matched >= 0.98 * result.in_view > 0
    assert summary["total"] == len(counted) and summary["frames_skipped"]["blur"] > 0


def test_count_uses_a_calibration_profile_made_by_hematovision_calibrate(tiny_bundle, samples_bccd, tmp_path, capsys):
    from hematovision.calibration.cli import main as calibrate_main
    from hematovision.pixels import read_rgb
    from test_calibration import blank_field, ruling_image

    def write(path, rgb):
        cv2.imwrite(str(path), np.ascontiguousarray(rgb[:, :, ::-1]))
        return str(path)

    # A camera with 30% vignetting and a colour cast: its blank fields and its view of the samples.
    camera = blank_field(seed=9, noise=0.0).astype(np.float32) / np.array([0.85, 0.75, 0.60]) / 255
    blanks = [write(tmp_path / f"blank{i}.png", blank_field(seed=i)) for i in range(3)]
    profile = tmp_path / "profile.json"
    assert calibrate_main(["blank", *blanks, "--out", str(profile)]) == 0
    ruling = write(tmp_path / "ruling.png", ruling_image(2.0 / 0.072, 0.0))
    assert calibrate_main(["micrometer", ruling, "--division-um", "2", "--profile", str(profile)]) == 0
    seen = tmp_path / "seen"
    seen.mkdir()
    fields = sorted((samples_bccd / FIELDS).glob("*.jpg"))[:8]
    for f in fields:
        write(seen / f"{f.stem}.png", np.clip(read_rgb(f) * camera * [0.85, 0.75, 0.60], 0, 255).astype(np.uint8))
    capsys.readouterr()
    assert edge_main(["count", "--model", str(tiny_bundle), "--json", *map(str, fields)]) == 0
    plain = _lines(capsys)
    assert edge_main(["count", "--model", str(tiny_bundle), "--json", "--calibration", str(profile), str(seen)]) == 0
    corrected = _lines(capsys)
    assert corrected[-1]["summary"]["pixel_size_source"] == ["given"]
    found = [len(r["cells"]) for r in corrected[:-1]]
    assert sum(found) >= sum(len(r["cells"]) for r in plain[:-1]) - 1 > 0


def test_colour_mapping_of_crops_matches_cropping_the_mapped_frame(tiny_bundle, samples_bccd):
    from hematovision.calibration.colour import StainStats
    from hematovision.calibration.correct import correct, correct_colour
    from hematovision.calibration.profile import CalibrationProfile, ColourCalibration
    from hematovision.edge.vision.classify import classify_crops, cut_cells
    from hematovision.edge.vision.model_bundle import load_bundle
    from hematovision.edge.vision.pipeline import FieldPipeline
    from hematovision.pixels import read_rgb

    colour = ColourCalibration(StainStats((70.0, 10.0, -5.0), (9.0, 9.0, 12.0), 3),
                               StainStats((74.0, 5.0, -1.0), (8.0, 8.5, 11.0), 300))
    profile = CalibrationProfile(image_size=(640, 480), colour=colour)
    bundle = load_bundle(tiny_bundle)
    pipeline = FieldPipeline(bundle, profile)
    field = read_rgb(sorted((samples_bccd / FIELDS).glob("*.jpg"))[0])
    image = pipeline.prepare(field)
    cells = pipeline.detect(image).cells
    centres = [c.center for c in cells]
    crops = correct_colour(cut_cells(image, centres, 0.072, bundle).reshape(-1, 64, 3), profile).reshape(-1, 64, 64, 3)
    expected = cut_cells(correct(field, profile), centres, 0.072, bundle)
    # Equal up to resampling: the Lab mapping is per pixel but not linear in RGB.
    assert cells and np.abs(crops.astype(int) - expected).mean() < 1.0
    got = pipeline.classify(image, cells, 0.072)
    assert [g.prediction.label for g in got] == [p.label for p in classify_crops(bundle, crops)]


# --- outputs checked first, the target, the white count ------------------------------------------

def test_count_with_report_naming_a_file_fails_before_counting(tiny_bundle, samples_bccd, tmp_path, capsys):
    taken = tmp_path / "report.html"
    taken.write_text("not a folder")
    assert edge_main(["count", "--model", str(tiny_bundle), str(samples_bccd / FIELDS), "--report", str(taken)]) == 1
    out, err = capsys.readouterr()
    assert "this is a file, not a folder" in err and str(taken) in err
    assert out == ""  # nothing counted: no table
    assert taken.read_text() == "not a folder"


def test_count_with_an_unwritable_report_folder_fails_before_counting(tiny_bundle, samples_bccd, tmp_path, capsys):
    blocked = tmp_path / "link"
    blocked.symlink_to(tmp_path)
    assert edge_main(["count", "--model", str(tiny_bundle), str(samples_bccd / FIELDS),
                      "--report", str(blocked / "reports")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "symlink" in err


def test_count_stops_after_the_field_that_reaches_the_target_and_says_so(tiny_bundle, samples_bccd, capsys):
    assert edge_main(["count", "--model", str(tiny_bundle), "--target", "5", "--json", str(samples_bccd / FIELDS)]) == 0
    rows = _lines(capsys)
    summary = rows[-1]["summary"]
    reached = summary["target_reached_after"]
    assert summary["target_reached"] and 5 <= summary["identified"] == reached["identified"]
    assert summary["fields"] == reached["fields"] == len(rows) - 1 < 34
    assert summary["inputs_not_counted"] == 34 - summary["fields"]
    assert summary["identified"] - 5 < len(rows[-2]["cells"])  # the last field counted reached the target


def test_count_table_says_where_counting_stopped_and_all_counts_every_field(tiny_bundle, samples_bccd, capsys):
    assert edge_main(["count", "--model", str(tiny_bundle), "--target", "5", str(samples_bccd / FIELDS)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "target 5 reached after" in first and "counting stopped there" in first and "not counted" in first
    assert edge_main(["count", "--model", str(tiny_bundle), "--target", "5", "--all", "--json",
                      str(samples_bccd / FIELDS)]) == 0
    summary = _lines(capsys)[-1]["summary"]
    assert summary["fields"] == 34 and summary["inputs_not_counted"] == 0
    assert summary["identified"] > summary["target_reached_after"]["identified"] >= 5
    from hematovision.edge.cli import format_table

    assert f"{summary['identified']} counted in all" in format_table(summary).splitlines()[0]


def test_count_with_the_white_count_gives_absolute_counts_per_class(tiny_bundle, samples_bccd, tmp_path, capsys):
    assert edge_main(["count", "--model", str(tiny_bundle), "--wbc", "8", "--json", "--report", str(tmp_path),
                      "--specimen-id", "W-1", str(samples_bccd / FIELDS)]) == 0
    summary = _lines(capsys)[-1]["summary"]
    assert summary["wbc_10e9_per_l"] == 8.0
    for c in summary["classes"]:
        assert c["absolute_10e9_per_l"] == pytest.approx(8.0 * c["percent"] / 100, abs=0.001)
    report = json.loads((tmp_path / "W-1.json").read_text())
    assert report["wbc_10e9_per_l"] == 8.0
    assert '<th title="absolute count">x10^9/L</th>' in (tmp_path / "W-1.html").read_text()
    csv_header = next(line for line in (tmp_path / "W-1.csv").read_text("utf-8-sig").splitlines()
                      if line.startswith("specimen_id,"))  # below a "needs full review" line, if flagged so
    assert ",absolute_10e9_per_l,change," in csv_header  # then the review's audit trail, then the bundle's columns
    from hematovision.edge.cli import format_table

    table = format_table(summary)
    assert "x10^9/L" in table.splitlines()[1] and "white count 8 x10^9/L" in table


def test_a_white_count_per_microlitre_is_refused_naming_the_unit(tiny_bundle, samples_bccd, capsys):
    with pytest.raises(SystemExit):
        edge_main(["count", "--model", str(tiny_bundle), "--wbc", "7500", str(samples_bccd / FIELDS)])
    assert "give it in 10^9/L" in capsys.readouterr().err


def test_report_cells_name_the_field_they_were_found_in(tiny_bundle, samples_bccd, tmp_path):
    assert edge_main(["count", "--model", str(tiny_bundle), "--report", str(tmp_path), "--specimen-id", "F-1",
                      str(samples_bccd / FIELDS)]) == 0
    report = json.loads((tmp_path / "F-1.json").read_text())
    names = {p.name for p in (samples_bccd / FIELDS).iterdir()}
    assert report["cells"] and all(c["field"] in names for c in report["cells"])
    html = (tmp_path / "F-1.html").read_text()
    assert f'<span class="field">{report["cells"][0]["field"]}</span>' in html
