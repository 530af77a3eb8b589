"""benchmarks/results_table.py (the README's results tables from the benchmarks' JSON) and
`benchmarks/cross_validate.py --summary-only`. Small JSON inputs in tmp_path; no shared data."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    if str(REPO / "benchmarks") not in sys.path:  # as when run as a script: its folder's modules (provenance)
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


rt = load_script("results_table")
cv = load_script("cross_validate")


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def lab(fields, wbc, det, iou, centre):
    return {"fields": fields, "wbc": wbc, "detections": det, "recall": iou / wbc, "precision": iou / det,
            "centre_recall": centre / wbc, "centre_precision": centre / det, "no_pixel_size": 0,
            "misses": {"duplicate": 0, "sliver": 0, "too small": 0, "box": 0, "not found": wbc - iou},
            "recall_without_artefacts": iou / wbc}


def fold(acc_f, f1_f, acc_q, f1_q, n=70):
    return {"fold": 0, "float": {"accuracy": acc_f, "macro_f1": f1_f}, "int8": {"accuracy": acc_q, "macro_f1": f1_q},
            "cells": n}


CV_SUMMARY = {"backbone": "efficientnet_lite0", "weights": "imagenet", "augment": "geometric", "centres": "boxes",
              "folds_planned": 5, "folds_done": 5, "complete": True, "cells": 352,
              "folds": [fold(0.87, 0.87, 0.86, 0.86)] * 5,
              "mean": {"float": {"accuracy": 0.8721, "macro_f1": 0.8761}, "int8": {"accuracy": 0.8636, "macro_f1": 0.8653}},
              "sd": {"float": {"accuracy": 0.0178, "macro_f1": 0.0327}, "int8": {"accuracy": 0.0196, "macro_f1": 0.0251}}}


def backbone_row(name, ms1, ms2, mb):
    return {"backbone": name, "params_M": 3.42, "train_img_s": 19.0, "infer_img_s": 31.4, "keras_ms": 45.2,
            "float_tflite_MB": 13.39, "int8_tflite_MB": mb, "float_ms_1t": 35.3, "int8_ms_1t": ms1,
            "int8_speedup_1t": 1.14, "float_ms_2t": 30.3, "int8_ms_2t": ms2, "int8_speedup_2t": 2.71}


@pytest.fixture
def reference(tmp_path) -> Path:
    """A reference bundle.json with the structure hematovision-export writes (the parts read here)."""
    metrics = {"classes": ["neutrophil", "lymphocyte", "monocyte", "eosinophil"], "n": 52,
               "accuracy": 0.8653846, "macro_f1": 0.8874579}
    write(tmp_path / "ref" / "bundle.json", {
        "format": "hematovision.bundle/1", "name": "hematovision-efficientnet_lite0",
        "metrics": {"split": "test", "float": metrics, "int8": dict(metrics, accuracy=0.8461538)},
        "gate": {"passed": True, "top1_agreement": 0.98},
        "provenance": {"run": "lite0_v3", "backbone": "efficientnet_lite0", "weights": "imagenet",
                       "train_config": {"backbone": "efficientnet_lite0", "augment": "geometric"}},
        "model_sha256": "abc", "model_bytes": 3984016})
    return tmp_path / "ref"


@pytest.fixture
def results(tmp_path) -> Path:
    """A results folder as `make results` fills it."""
    out = tmp_path / "results"
    write(out / "kaggle.json", {
        "model": "models/reference", "bundle_name": "hematovision-efficientnet_lite0", "model_sha256": "abc",
        "training": {"run": "lite0_v3", "backbone": "efficientnet_lite0", "augment": "geometric"},
        "split": "TEST", "limit_per_class": 0, "images": 2487, "correct": 2110, "accuracy": 2110 / 2487,
        "macro_f1": 0.8822, "per_class": {"neutrophil": {"n": 624, "recall": 0.84, "precision": 0.951}},
        "not_found": 0, "unidentified": 206, "originals": 71, "originals_correct": 71, "majority_vote_accuracy": 1.0})
    write(out / "detection.json", {
        "split": "val", "pixel_size": "field", "limit": 0, "params": {}, "iou_threshold": 0.5,
        "txl_pbc": {"BCCD": lab(44, 45, 43, 43, 43), "PBC": lab(100, 105, 103, 103, 103)},
        "bccd_voc": {"BCCD (VOC)": lab(364, 372, 374, 361, 364)},
        "speed": {"median_ms": 6.21, "p95_ms": 13.1, "fields": 60, "repeats": 3}})
    write(out / "backbones.json", {
        "machine_cores": 2, "batch": 32, "steps": 3, "invocations": 200, "calibration": 64, "weights": "random",
        "input_size": 224, "backbones": {"efficientnet_b0": backbone_row("efficientnet_b0", 23.48, 20.09, 4.83),
                                         "resnet50": backbone_row("resnet50", 81.64, 29.86, 24.21),
                                         "efficientnet_lite0": backbone_row("efficientnet_lite0", 30.96, 11.17, 3.89)}})
    rows = [{"threads": t, "fields": 100, "cells": 105, "segment_ms_median": 3.2, "segment_ms_p95": 5.0,
             "classify_ms_per_cell": ms, "pipeline_ms_per_field": 15.0, "pipeline_over_classifier": ratio}
            for t, ms, ratio in ((1, 8.8, 1.71), (2, 9.0, 1.75))]
    write(out / "pipeline.json", {"model": "models/reference", "fields_dir": "../shared/data/bccd/BCCD/JPEGImages",
                                  "fields": 100, "repeats": 3, "rows": rows, "peak_rss_mb": 198.2})
    write(out / "cv_lite0.json", CV_SUMMARY)
    return out


def table_row(text: str, start: str) -> list[str]:
    """The cells of the one table row whose first cell starts with `start`."""
    rows = [line for line in text.splitlines() if line.startswith("| " + start)]
    assert len(rows) == 1, (start, rows)
    return [c.strip() for c in rows[0].strip("|").split(" | ")]


def render(results: Path, reference: Path, *cv_files: Path) -> str:
    return rt.render(rt.Results(results, list(cv_files), reference))


def test_classifier_rows_next_to_the_papers_claims(results, reference):
    text = render(results, reference)
    b0 = table_row(text, "EfficientNetB0")
    assert b0[1] == '95.8% accuracy, 95.2% F1, "fast"'
    assert b0[2] == "ImageNet weights not reachable offline; not trained"
    assert b0[5:] == ["23.5 / 20.1 ms", "4.83 MB"]
    resnet = table_row(text, "ResNet50")
    assert resnet[1] == '94.2% accuracy, 93.7% F1, "medium"'
    assert resnet[2] == "ImageNet weights not reachable offline; not trained"
    assert resnet[5:] == ["81.6 / 29.9 ms", "24.2 MB"]
    lite = table_row(text, "EfficientNet-Lite0, grouped 5-fold CV")
    assert "352 cells" in lite[0] and "geometric augmentation" in lite[0]
    assert lite[1] == "n/a"
    assert lite[2] == "0.872 ± 0.018 / 0.876 ± 0.033"
    assert lite[3] == "0.864 ± 0.020 / 0.865 ± 0.025"
    assert lite[4] == "—"  # Kaggle TEST: the reference model only
    assert lite[5:] == ["31.0 / 11.2 ms", "3.89 MB"]


def test_reference_bundle_row_and_kaggle(results, reference):
    text = render(results, reference)
    ref = table_row(text, "EfficientNet-Lite0, reference bundle")
    assert "52" in ref[0]
    assert ref[2] == "0.865 / 0.887"
    assert ref[3] == "0.846 / 0.887; int8/float top-1 agreement 98.0%"
    assert ref[4].startswith("84.8% accuracy, macro-F1 0.882 (2,487 images; 206 unidentified")
    assert "71/71 originals by majority vote" in ref[4]
    assert ref[5:] == ["31.0 / 11.2 ms", "3.98 MB"]
    assert "is not held-out" in text and "run lite0_v3" in text


def test_device_targets_and_detection_per_lab(results, reference):
    text = render(results, reference)
    det = table_row(text, "white-cell detection, TXL-PBC val")
    assert det[2] == "BCCD 0.956 / 1.000, PBC 0.981 / 1.000 (not met)"
    assert table_row(text, "segmentation per 640x480 field")[2].startswith("6.2 ms median, 13.1 ms 95th percentile")
    ratio = table_row(text, "whole pipeline / classifier time, 100 BCCD fields")[2]
    assert ratio.startswith("1.71 / 1.75 (1 / 2 threads; 105 cells in 100 fields")
    assert table_row(text, "peak RSS of `count` over 100 fields")[2] == "198 MB"
    assert table_row(text, "int8 model size")[2].startswith("3.98 MB")
    assert table_row(text, "TXL-PBC val | PBC") == ["TXL-PBC val", "PBC", "100", "105", "103", "0.981 / 1.000",
                                                     "0.981 / 1.000", "0.981", "met"]
    assert table_row(text, "TXL-PBC val | BCCD")[-1] == "not met"
    assert table_row(text, "BCCD (VOC boxes)")[1:6] == ["BCCD (VOC)", "364", "372", "374", "0.970 / 0.965"]


def test_missing_json_gives_not_measured_cells(tmp_path, reference):
    empty = tmp_path / "empty"
    empty.mkdir()
    text = render(empty, reference)
    shown = rt.shown(empty)
    assert not Path(shown).is_absolute()
    assert table_row(text, "EfficientNetB0")[2] == "ImageNet weights not reachable offline; not trained"
    assert table_row(text, "EfficientNet-Lite0, grouped 5-fold CV")[2] == "not measured (run: `make cv`)"
    make = f"make results RERUN={{}} RESULTS={shown}"
    assert table_row(text, "EfficientNetB0")[5] == f"not measured (run: `{make.format('backbones')}`)"
    assert table_row(text, "EfficientNet-Lite0, reference bundle")[4] == f"not measured (run: `{make.format('kaggle')}`)"
    assert table_row(text, "white-cell detection")[2] == f"not measured (run: `{make.format('detection')}`)"
    assert table_row(text, "peak RSS")[2] == f"not measured (run: `{make.format('pipeline')}`)"
    assert "White-cell detection per lab: not measured (run: " in text
    assert table_row(text, "count-once")[2] == f"not measured (run: `{make.format('scan')}`)"
    assert table_row(text, "daemon RSS over a 30-minute replay")[2] == f"not measured (run: `{make.format('daemon')}`)"
    assert table_row(text, "frame rate with the web page watched")[2] == f"not measured (run: `{make.format('web')}`)"
    assert table_row(text, "daemon RSS over a 10-minute replay with the web page")[2] == \
        f"not measured (run: `{make.format('web')}`)"
    # The reference bundle still gives the held-out figures and the model size.
    assert table_row(text, "EfficientNet-Lite0, reference bundle")[2] == "0.865 / 0.887"
    no_bundle = render(empty, tmp_path / "no_bundle")
    assert table_row(no_bundle, "reference bundle")[2] == "not measured (run: `make reference`)"
    assert "int8 model size | <= 6 MB | not measured (run: `make reference`)" in no_bundle


def test_cv_summaries_one_row_each_partial_marked(results, reference, tmp_path):
    partial = dict(CV_SUMMARY, centres="segmenter", augment="stain", folds_done=2, complete=False, cells=141)
    text = render(results, reference, write(tmp_path / "elsewhere" / "summary.json", partial))
    rows = [line for line in text.splitlines() if line.startswith("| EfficientNet-Lite0, grouped 5-fold CV")]
    assert len(rows) == 2
    seg = table_row(text, "EfficientNet-Lite0, grouped 5-fold CV on BCCD cells (crops where the segmenter")
    assert "stain augmentation" in seg[0] and "2 of 5 folds finished" in seg[0]


def test_readme_markers_replaced_text_outside_kept(results, reference, tmp_path):
    before = "# Title\n\nprose before\n\n"
    after = "\n\nprose after, with `code` and | pipes\n"
    readme = tmp_path / "README.md"
    readme.write_text(before + rt.BEGIN + "\n\n| old | table |\n|---|---|\n\n" + rt.END + after)
    args = ["--results", str(results), "--reference", str(reference), "--readme", str(readme)]
    assert rt.main(args) == 0
    text = readme.read_text()
    assert text.startswith(before + rt.BEGIN + "\n\n| model | design paper |")
    assert text.endswith("\n\n" + rt.END + after)
    assert "| old | table |" not in text
    block = text[text.index(rt.BEGIN) + len(rt.BEGIN):text.index(rt.END)]
    assert block.strip("\n") == render(results, reference).strip("\n")
    assert rt.main(args) == 0 and readme.read_text() == text  # a second run changes nothing


@pytest.mark.parametrize("content", ["# no markers\n", f"{rt.BEGIN}\nonly the beginning\n",
                                     f"{rt.END}\n{rt.BEGIN}\n", f"{rt.BEGIN}\n{rt.END}\n{rt.BEGIN}\n{rt.END}\n"])
def test_readme_without_one_marker_pair_refused(results, reference, tmp_path, capsys, content):
    readme = tmp_path / "README.md"
    readme.write_text(content)
    assert rt.main(["--results", str(results), "--reference", str(reference), "--readme", str(readme)]) == 1
    assert readme.read_text() == content
    err = capsys.readouterr().err
    assert "results_table.py: error:" in err and "results:" in err


def test_the_repository_readme_has_one_marker_pair():
    text = (REPO / "README.md").read_text()
    assert text.count(rt.BEGIN) == 1 and text.count(rt.END) == 1
    assert text.index(rt.BEGIN) < text.index(rt.END)
    assert text.index("## Measured results") < text.index(rt.BEGIN)


def test_invalid_json_named_in_the_error(results, reference, capsys):
    (results / "pipeline.json").write_text("{not json")
    assert rt.main(["--results", str(results), "--reference", str(reference)]) == 1
    assert "pipeline.json: not valid JSON" in capsys.readouterr().err


def test_benchmark_writers_match_what_the_table_reads(tmp_path, reference):
    """The JSON the benchmarks build (their own functions) is what results_table reads."""
    kaggle = load_script("bench_kaggle_pipeline")
    outcomes = Counter({("neutrophil", "neutrophil"): 8, ("neutrophil", "unidentified"): 2,
                        ("eosinophil", "eosinophil"): 9, ("eosinophil", "no cell found"): 1})
    votes = defaultdict(Counter, {("neutrophil", "1"): Counter(neutrophil=10), ("eosinophil", "2"): Counter(eosinophil=10)})
    figures = kaggle.figures(outcomes, votes, ["neutrophil", "lymphocyte", "monocyte", "eosinophil"])
    out = tmp_path / "results"
    write(out / "kaggle.json", {"model": "models/other", **figures, "limit_per_class": 5})
    detection = load_script("bench_detection")
    counts = defaultdict(lambda: defaultdict(int))
    counts["PBC"].update({"fields": 10, "truth": 10, "detected": 10, "iou": 10, "centre": 10})
    write(out / "detection.json", {"split": "val", "limit": 0, "txl_pbc": detection.figures(counts)})
    backbones = load_script("bench_backbones")
    args = type("Args", (), {"batch": 4, "steps": 1, "invocations": 5, "calibration": 4})()
    device = {"bundle": "models/reference", "model_ms_1t": 31.0, "model_ms_2t": 11.5, "device_ms_1t": 33.0,
              "device_ms_2t": 12.0, "model_ratio_to_plain_int8_1t": 31.0 / 30.0, "model_ratio_to_plain_int8_2t": 11.5 / 11.0,
              "device_ratio_to_plain_int8_1t": 1.1, "device_ratio_to_plain_int8_2t": 12.0 / 11.0}
    backbones.write_json(out / "backbones.json", [backbone_row("efficientnet_lite0", 30.0, 11.0, 3.9)], device, args)
    text = render(out, reference)
    cell = table_row(text, "EfficientNet-Lite0, reference bundle")[4]
    assert cell.startswith("85.0% accuracy") and "2 unidentified and 1 with no cell found" in cell
    assert "2/2 originals" in cell and "model `models/other`" in cell and "5 images per class" in cell
    assert table_row(text, "TXL-PBC val | PBC")[-1] == "met"
    assert table_row(text, "EfficientNet-Lite0, grouped")[5:] == ["30.0 / 11.0 ms", "3.90 MB"]
    assert table_row(text, "int8 model with its feature output")[2].startswith("1.03 / 1.05 (1 / 2 threads")
    assert table_row(text, "whole per-crop classification")[2].startswith("1.10 / 1.09")


def test_bench_scan_json_on_the_committed_samples(tmp_path, reference):
    """A tiny real scan (2x2 sample fields, one run; a few seconds): its JSON is what the count-once row shows."""
    scan = load_script("bench_scan")
    out = tmp_path / "results"
    assert scan.main(["--data", str(REPO / "samples" / "bccd"), "--runs", "1", "--columns", "2", "--rows", "2",
                      "--detours", "1", "--json", str(out / "scan.json")]) == 0
    data = json.loads((out / "scan.json").read_text())
    assert data["settings"] == {"runs": 1, "columns": 2, "rows": 2, "detours": 1, "data": "samples/bccd"}
    assert len(data["per_run"]) == 1
    run = data["per_run"][0]
    for key in ("frames", "whole_cells", "counted_once", "double_counts", "jumps", "relocalised"):
        assert data[key] == run[key]  # one run: the totals are that run
    assert data["frames"] > 0 and 0 < data["whole_cells"] and data["counted_once"] <= data["whole_cells"]
    cell = table_row(render(out, reference), "count-once")[2]
    assert cell == (f"{data['frames']:,} frames: {data['counted_once']} of {data['whole_cells']} whole cells counted "
                    f"once, {data['double_counts']} double counts; {data['jumps']} jumps, "
                    f"{data['relocalised']} relocalised")


def test_bench_scan_totals_sum_the_runs():
    scan = load_script("bench_scan")
    from hematovision.edge.counting.scansim import ScanScore
    from hematovision.edge.counting.track import TrackCounters

    def run(frames, in_view, matched, doubles, jumps, relocalised):
        return {"score": ScanScore(in_view=in_view, counted=matched + doubles, matched=matched, doubles=doubles,
                                   missed=in_view - matched, cut=0, false_positives=0),
                "counters": TrackCounters(frames=frames, jumps=jumps, relocalised=relocalised), "frames": frames,
                "reg_ms": 2.0, "feed_ms": 3.0, "feed_ms_max": 9.0, "drift_um": 1.0}

    args = type("Args", (), {"runs": 2, "columns": 6, "rows": 5, "detours": 4, "data": REPO / "samples" / "bccd"})()
    data = scan.json_result([run(300, 20, 20, 0, 8, 6), run(350, 19, 18, 1, 9, 7)], args)
    assert {k: data[k] for k in ("frames", "whole_cells", "counted_once", "double_counts", "jumps", "relocalised")} == {
        "frames": 650, "whole_cells": 39, "counted_once": 38, "double_counts": 1, "jumps": 17, "relocalised": 13}
    assert [r["frames"] for r in data["per_run"]] == [300, 350]
    assert data["command"] == (".venv/bin/python benchmarks/bench_scan.py --runs 2 --columns 6 --rows 5 "
                               "--detours 4 --data samples/bccd")


def test_bench_daemon_memory_json_is_what_the_table_reads(tmp_path, reference):
    """The daemon bench's figures (from RSS samples; no daemon run) as the daemon row shows them."""
    daemon = load_script("bench_daemon_memory")
    args = type("Args", (), {"model": REPO / "models" / "reference", "minutes": 30.0, "fps": 5.0, "target": 100,
                             "threads": 0, "every_s": 5.0, "warmup_s": 5.0, "web": False})()
    samples = [(5.0, 106.7), (10.0, 110.1), (15.0, 110.5), (20.0, 112.0), (25.0, 111.0), (30.0, 111.4)]
    work = {"specimens": 2, "frames": 150, "cells_counted": 120}
    out = tmp_path / "results"
    write(out / "daemon.json", daemon.figures(samples, 0, work, args))
    data = json.loads((out / "daemon.json").read_text())
    assert data["minutes"] == pytest.approx(0.5) and data["settings"]["model"] == "models/reference"
    assert data["first_third_mb"] == pytest.approx(108.4) and data["last_third_mb"] == pytest.approx(111.2)
    assert (data["frames"], data["exit_status"], len(data["samples"])) == (150, 0, 6)
    assert table_row(render(out, reference), "daemon RSS over a 30-minute replay")[2] == (
        "106.7 MB at start, 111.4 MB at end, max 112.0; first / last third 108.4 / 111.2 MB")


def test_bench_daemon_memory_with_the_web_page_has_its_own_row_with_what_the_page_did(tmp_path, reference):
    daemon = load_script("bench_daemon_memory")
    args = type("Args", (), {"model": REPO / "models" / "reference", "minutes": 10.0, "fps": 5.0, "target": 20,
                             "threads": 0, "every_s": 5.0, "warmup_s": 5.0, "web": True})()
    use = dict(daemon.page_use(), status=580, frames=577, bytes=9_000_000, reclassified=41, signed=43, errors=1)
    samples = [(5.0, 140.2), (200.0, 151.0), (400.0, 152.3), (600.0, 150.9)]
    out = tmp_path / "results"
    write(out / "daemon_web.json", daemon.figures(samples, 0, {"specimens": 44, "frames": 3000, "cells_counted": 880,
                                                               "web": use}, args))
    text = render(out, reference)
    cells = table_row(text, "daemon RSS over a 10-minute replay with the web page watched")
    assert "`benchmarks/bench_daemon_memory.py --web --minutes 10 --fps 5 --target 20`" in cells[0]
    assert cells[1:] == ["<= 250 MB, no growth",
                         "140.2 MB at start, 150.9 MB at end, max 152.3; first / last third 140.2 / 150.9 MB; the page "
                         "served 580 status and 577 frame requests, 41 cells reclassified, 43 reports signed, 1 failed "
                         "requests"]
    assert "not measured" in table_row(text, "daemon RSS over a 30-minute replay")[2]  # daemon.json is another file


def test_bench_web_ratios_are_each_rounds_rate_over_that_rounds_web_off(tmp_path, reference):
    """bench_web's JSON (its own function, from three rounds of runs; no daemon run) as the frame-rate row shows it."""
    web = load_script("bench_web")

    def run(case, fps, rss):
        return {"case": case, "frames": round(fps * 45), "seconds": 45.0, "fps": fps, "peak_rss_mb": rss,
                "requests": {"status": 0, "frames": 0, "bytes": 0, "errors": 0}}

    plan = [("off", "web off"), ("unwatched", "web on, nobody watching"), ("watched", "web on, 1 live page(s)")]
    runs = [[run("web off", f, 98.0) for f in (70.0, 60.0, 72.0)],
            [run("web on, nobody watching", f, 109.0) for f in (71.4, 57.0, 72.0)],
            [run("web on, 1 live page(s)", f, r) for f, r in ((68.6, 150.0), (57.6, 152.1), (69.1, 151.0))]]
    args = type("Args", (), {"model": REPO / "models" / "reference", "seconds": 45.0, "warmup_s": 12.0, "repeat": 3,
                             "pollers": 1, "threads": 0})()
    data = web.json_result(plan, runs, args)
    watched = data["cases"][2]
    assert watched["fps_vs_web_off_rounds"] == [0.98, 0.96, 0.96] and watched["fps_vs_web_off"] == 0.96
    assert (watched["fps"], watched["peak_rss_mb"]) == (68.6, 152.1)  # median rate, highest RSS
    assert data["cases"][1]["fps_vs_web_off"] == 1.0 and data["cases"][0]["fps_vs_web_off"] == 1.0
    out = tmp_path / "results"
    write(out / "web.json", data)
    cells = table_row(render(out, reference), "frame rate with the web page watched")
    assert "(1 live page(s) and 10 requests/s)" in cells[0]
    assert "`benchmarks/bench_web.py --seconds 45 --repeat 3`" in cells[0]
    assert cells[1:] == ["the frame loop never waits on the page",
                         "0.96 watched, 1.00 served unwatched (median of 3 rounds; 70.0 / 71.4 / 68.6 frames/s "
                         "off / unwatched / watched); peak RSS 98 / 109 / 152 MB"]


# -- cross_validate.py --summary-only ---------------------------------------------------------------

def fake_fold_bundle(out: Path, k: int, acc_f, f1_f, acc_q, f1_q) -> None:
    write(out / f"fold{k}_bundle" / "bundle.json",
          {"metrics": {"split": "test", "float": {"accuracy": acc_f, "macro_f1": f1_f},
                       "int8": {"accuracy": acc_q, "macro_f1": f1_q}}})


def test_cross_validate_summary_only(tmp_path, capsys):
    out = tmp_path / "cv"
    fake_fold_bundle(out, 0, 0.80, 0.70, 0.78, 0.69)
    fake_fold_bundle(out, 1, 0.90, 0.80, 0.86, 0.75)
    args = ["--summary-only", "--out", str(out), "--backbone", "resnet50", "--centres", "segmenter",
            "--augment", "stain"]
    assert cv.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["backbone"], summary["centres"], summary["augment"]) == ("resnet50", "segmenter", "stain")
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    assert summary["folds"][1]["int8"] == {"accuracy": 0.86, "macro_f1": 0.75}
    assert summary["mean"]["float"]["accuracy"] == pytest.approx(0.85)
    assert summary["mean"]["int8"]["macro_f1"] == pytest.approx(0.72)
    assert summary["sd"]["float"]["accuracy"] == pytest.approx(statistics.stdev([0.80, 0.90]))
    assert summary["sd"]["int8"]["accuracy"] == pytest.approx(0.056568, abs=1e-6)
    assert (summary["folds_done"], summary["folds_planned"], summary["complete"]) == (2, 5, False)
    assert "float accuracy: mean 0.8500 sd 0.0707 over 2 folds" in capsys.readouterr().out
    # The summary is what results_table reads.
    results = tmp_path / "results"
    write(results / "cv_resnet50.json", summary)
    text = render(results, tmp_path / "no_bundle")
    resnet = table_row(text, "ResNet50")
    assert resnet[2] == "0.850 ± 0.071 / 0.750 ± 0.071" and "2 of 5 folds finished" in resnet[0]


def test_cross_validate_summary_only_settings_from_the_folds(tmp_path):
    """Backbone and augmentation from the bundles' provenance, centres from the fold's data sources."""
    out = tmp_path / "cv"
    fake_fold_bundle(out, 3, 0.8, 0.8, 0.8, 0.8)
    bundle = json.loads((out / "fold3_bundle" / "bundle.json").read_text())
    bundle["provenance"] = {"backbone": "efficientnet_lite0", "sources": ["bccd:bccd (segmenter centres)"],
                            "train_config": {"backbone": "efficientnet_lite0", "augment": "stain"}}
    write(out / "fold3_bundle" / "bundle.json", bundle)
    assert cv.main(["--summary-only", "--out", str(out), "--backbone", "resnet50", "--folds", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["backbone"], summary["augment"], summary["centres"]) == ("efficientnet_lite0", "stain", "segmenter")
    assert summary["sd"]["float"]["accuracy"] == 0.0 and summary["folds_planned"] == 4


def test_cross_validate_summary_only_without_folds_fails(tmp_path, capsys):
    assert cv.main(["--summary-only", "--out", str(tmp_path)]) == 1
    assert "no finished fold" in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_kaggle_note_says_held_out_when_the_bundle_held_out_the_kaggle_fields(tmp_path, results, reference):
    kaggle = load_script("bench_kaggle_pipeline")
    bundle = tmp_path / "heldout"
    write(bundle / "bundle.json", {"name": "hematovision-efficientnet_lite0", "model_sha256": "abc",
                                   "provenance": {"run": "lite0_kt", "backbone": "efficientnet_lite0",
                                                  "test_groups": {"source": "kaggle_test_origins.csv",
                                                                  "groups": ["bccd:00001"]}}})
    described = kaggle.model_description(bundle)
    assert described["training"]["test_source"] == "kaggle_test_origins.csv"
    data = json.loads((results / "kaggle.json").read_text())
    write(results / "kaggle.json", {**data, **described})
    text = render(results, reference)
    assert "were held out of the model's training (kaggle_test_origins.csv)" in text
    assert "is not held-out" not in text


def test_crosslab_figures_are_what_the_table_shows(tmp_path, reference):
    """Leave-one-lab-out and reference figures per lab, as benchmarks/crosslab.py builds them."""
    import numpy as np

    from hematovision.train.evaluate import compute_metrics

    crosslab = load_script("crosslab")
    classes = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
    y = np.repeat(np.arange(4), 10)
    pred = np.where(y == 2, 3, y)  # monocytes all called eosinophils: eosinophils take twice their share
    metrics = {k: compute_metrics(np.eye(4)[pred], y, classes).to_dict() for k in ("float", "int8")}
    figures = crosslab.lab_figures(metrics, tmp_path / "png", "bccd_to_pbc on pbc")
    assert (tmp_path / "png" / "int8" / "confusion.png").is_file()
    assert figures["int8"]["max_share_ratio"] == 2.0 and figures["int8"]["recall"]["monocyte"] == 0.0
    for kind in ("float", "int8"):
        figures[kind]["shared_macro_f1"] = crosslab.shared_macro_f1(metrics[kind])
    shares = {"PBC": {"fields": 3, "cells": 40, "unidentified": 2, "other": {},
                      "shares": {"neutrophil": 0.25, "lymphocyte": 0.25, "monocyte": 0.0, "eosinophil": 0.5}}}
    out = tmp_path / "results"
    write(out / "crosslab.json", {"commit": "abc1234", "date": "2026-11-30", "reference_intervals": crosslab.REFERENCE_INTERVALS,
                                  "directions": {"bccd_to_pbc": {"by_lab": {"pbc": figures}}},
                                  "txl_shares": {"bccd_to_pbc": shares}})
    text = render(out, reference)
    cells = table_row(text, "BCCD only | every PBC cell")
    assert cells[2:] == ["40", "0.667", "0.667", "0.750", "2.00", "macro-F1 >= 0.85: not met"]
    assert table_row(text, "bccd_to_pbc | PBC")[2:5] == ["40", "25%", "25%"]


# -- committed results and their provenance -----------------------------------------------------------

def test_the_readme_tables_are_the_committed_results_rendered():
    """`make results` on a clean clone rebuilds the README's tables byte for byte from benchmarks/results/."""
    results, reference = REPO / "benchmarks" / "results", REPO / "models" / "reference"
    block = render(results, reference)
    assert render(results, reference) == block
    readme = (REPO / "README.md").read_text()
    assert rt.replace_between_markers(readme, block) == readme, "run `make results` and commit README.md"


def test_results_files_name_their_commit_cores_and_date(tmp_path):
    provenance = load_script("provenance")
    provenance.write_result(tmp_path / "results" / "x.json", {"figure": 1.5, "date": "2026-01-02"})
    data = json.loads((tmp_path / "results" / "x.json").read_text())
    assert list(data) == ["commit", "cores", "date", "figure"]
    assert data["cores"] == os.cpu_count() and data["date"] == "2026-01-02"  # a date given at the start is kept
    assert data["commit"] is None or re.fullmatch(r"[0-9a-f]{4,40}(-dirty)?", data["commit"])
    assert not list((tmp_path / "results").glob("*.partial"))
    committed = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    assert [p.name for p in committed if not {"commit", "cores", "date"} <= set(json.loads(p.read_text()))] == []


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py") if p.name not in (
    "results_table.py", "provenance.py") and ('"--json"' in p.read_text() or "summary.json" in p.read_text())))
def test_every_benchmark_writes_its_json_through_the_provenance_writer(script):
    assert "write_result(" in (REPO / "benchmarks" / script).read_text()


def test_tables_end_with_where_each_file_was_measured(results, reference, tmp_path):
    data = json.loads((results / "pipeline.json").read_text())
    write(results / "pipeline.json", {"commit": "abc1234", "cores": 2, "date": "2026-11-30", **data})
    line = next(line for line in render(results, reference).splitlines() if line.startswith("Measured: "))
    assert "`pipeline.json` commit abc1234, 2 cores, 2026-11-30" in line
    assert "`kaggle.json` commit, cores and date not recorded" in line
    assert "Measured: " not in render(tmp_path / "no_results", reference)


def test_specimen_flag_rows_show_each_bundle_lab_and_shift(tmp_path, reference):
    out = tmp_path / "results"
    row_ = {"lab": "pbc", "condition": "none", "accuracy": 0.48, "selective_accuracy": 0.9, "coverage": 0.31,
            "outside_training": 0.99, "target": "accuracy < 0.80: flag >= 95% met"}
    write(out / "flags_bccd_to_pbc.json", {"bundle": "runs/crosslab/bccd_to_pbc_bundle", "rows": [row_]})
    cells = table_row(render(out, reference), "`runs/crosslab/bccd_to_pbc_bundle`")
    assert cells[1:] == ["pbc", "none", "0.480", "90.0%", "31.0%", "99.0%", "accuracy < 0.80: flag >= 95% met"]
