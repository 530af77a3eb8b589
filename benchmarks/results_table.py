"""The README's "Measured results" tables, regenerated from the benchmarks' JSON files.

    python3 benchmarks/results_table.py --results benchmarks/results               # print the tables
    python3 benchmarks/results_table.py --results benchmarks/results --readme README.md

`make results` runs this script (`make results RERUN="kaggle detection"` reruns those benchmarks with
`--json` into benchmarks/results/ first); it needs nothing but Python's standard library. It reads
from the results folder (each file optional; a missing one gives "not measured (run: COMMAND)"
cells instead of an error), where every file names the commit, cores and date it was measured on
(benchmarks/provenance.py); the tables end with that line per file:

    kaggle.json      benchmarks/bench_kaggle_pipeline.py --json   whole pipeline on Kaggle TEST
    detection.json   benchmarks/bench_detection.py --json         white-cell detection per lab, speed
    backbones.json   benchmarks/bench_backbones.py --json         per-crop latency and size per backbone
    pipeline.json    benchmarks/bench_pipeline.py --json          pipeline/classifier time, peak RSS
    cv_*.json        OUT/summary.json of benchmarks/cross_validate.py (one per cross-validation)
    crosslab.json    benchmarks/crosslab.py --json                classification per laboratory
    scan.json        benchmarks/bench_scan.py --json              count-once totals over the simulated scans
    daemon.json      benchmarks/bench_daemon_memory.py --json     daemon RSS over a replay
    web.json         benchmarks/bench_web.py --json               frame rate with the web page off, served, watched
    daemon_web.json  bench_daemon_memory.py --web --json          daemon RSS with the web page watched and used

Of scan.json this script reads "frames", "whole_cells", "counted_once", "double_counts", "jumps" and
"relocalised"; of daemon.json and daemon_web.json "start_mb", "end_mb", "max_mb", "first_third_mb" and
"last_third_mb" (and daemon_web.json's "web": what the page was asked and did); of web.json each case's "key",
"fps", "fps_vs_web_off" and "peak_rss_mb"; other keys are ignored. More cross-validation summaries can be named with --cv.
The reference bundle's bundle.json (--reference, default models/reference) gives the held-out
float and int8 figures, their top-1 agreement and the int8 model size.

With --readme the text between the lines `<!-- results:begin -->` and `<!-- results:end -->` is
replaced and everything outside them is kept; a README without exactly one pair is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- results:begin -->"
END = "<!-- results:end -->"
DEFAULT_RESULTS = "benchmarks/results"

BACKBONES = ("efficientnet_b0", "resnet50", "efficientnet_lite0")
NAMES = {"efficientnet_b0": "EfficientNetB0", "resnet50": "ResNet50", "efficientnet_lite0": "EfficientNet-Lite0"}
PAPER = {"efficientnet_b0": '95.8% accuracy, 95.2% F1, "fast"', "resnet50": '94.2% accuracy, 93.7% F1, "medium"'}
CENTRES = {"boxes": "crops at the annotated box centres", "segmenter": "crops where the segmenter finds each cell"}
NOT_TRAINED = "ImageNet weights not reachable offline; not trained"
DETECTION_TARGET = (0.98, 0.95)


class ResultsError(Exception):
    """A results file or README that cannot be used; the message says which and why."""


def shown(path: Path | str) -> str:
    """A path as written into the tables: relative to the repository, never an absolute path."""
    return os.path.relpath(Path(path).resolve(), REPO)


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ResultsError(f"{path}: not valid JSON ({err}); rerun the benchmark that writes it") from err


def not_measured(command: str) -> str:
    return f"not measured (run: `{command}`)"


def frac(x) -> str:
    return f"{x:.3f}"


def pct(x) -> str:
    return f"{100 * x:.1f}%"


def mean_sd(summary: dict, kind: str, key: str) -> str:
    return f"{frac(summary['mean'][kind][key])} ± {frac(summary['sd'][kind][key])}"


def mb(x) -> str:
    return f"{x:.2f} MB" if x < 10 else f"{x:.1f} MB"


class Results:
    """Everything the tables are made of, read once."""

    def __init__(self, results: Path, cv_files: list[Path] = (), reference: Path = REPO / "models" / "reference"):
        self.dir = results
        self.read: dict[str, dict] = {}  # every file read, by its name as shown: for its provenance
        self.kaggle = self.file(results / "kaggle.json")
        self.detection = self.file(results / "detection.json")
        self.backbones = self.file(results / "backbones.json")
        self.pipeline = self.file(results / "pipeline.json")
        self.scan = self.file(results / "scan.json")
        self.daemon = self.file(results / "daemon.json")
        self.web = self.file(results / "web.json")
        self.daemon_web = self.file(results / "daemon_web.json")
        self.crosslab = self.file(results / "crosslab.json")
        self.flags = {path.stem: self.file(path) for path in sorted(results.glob("flags*.json"))}
        paths = sorted(results.glob("cv_*.json")) + [p for p in cv_files]
        self.cv = []
        for path in paths:
            summary = self.file(path)
            if summary is None:
                raise ResultsError(f"{path}: no such cross-validation summary")
            if not {"backbone", "mean", "sd"} <= set(summary):
                raise ResultsError(f"{path}: not a cross_validate.py summary (needs backbone, mean, sd)")
            self.cv.append(summary)
        self.reference_dir = reference
        self.reference = read_json(reference / "bundle.json")

    def file(self, path: Path) -> dict | None:
        data = read_json(path)
        if data is not None:
            self.read[path.name if path.parent == self.dir else shown(path)] = data
        return data

    def command(self, name: str) -> str:
        """The command that measures benchmark `name` (the Makefile's RERUN names) into this folder."""
        where = "" if shown(self.dir) == DEFAULT_RESULTS else f" RESULTS={shown(self.dir)}"
        return f"make results RERUN={name}{where}"


# -- the classifier table -------------------------------------------------------------------------

def classifier_table(r: Results) -> list[str]:
    lines = ["| model | design paper | float accuracy / macro-F1 | int8 accuracy / macro-F1 "
             "| whole pipeline, Kaggle TEST | int8 latency per crop, 1 / 2 threads | int8 size |",
             "|---|---|---|---|---|---|---|"]
    backbones = list(BACKBONES) + sorted({s["backbone"] for s in r.cv} - set(BACKBONES))
    for backbone in backbones:
        latency, size = backbone_speed(r, backbone)
        name, paper = NAMES.get(backbone, backbone), PAPER.get(backbone, "n/a")
        summaries = [s for s in r.cv if s["backbone"] == backbone]
        if not summaries:
            if backbone in PAPER:
                cells = [NOT_TRAINED, "—"]
            else:
                cells = [not_measured("make cv"), "—"]
            lines.append(row(f"{name}, grouped 5-fold CV on BCCD cells", paper, *cells, "—", latency, size))
        for s in summaries:
            lines.append(row(cv_label(name, s), paper, f"{mean_sd(s, 'float', 'accuracy')} / {mean_sd(s, 'float', 'macro_f1')}",
                             f"{mean_sd(s, 'int8', 'accuracy')} / {mean_sd(s, 'int8', 'macro_f1')}", "—", latency, size))
    lines.append(reference_row(r))
    return lines


def cv_label(name: str, s: dict) -> str:
    details = [CENTRES.get(s.get("centres"), f"{s.get('centres')} centres") if s.get("centres") else None,
               f"{s['augment']} augmentation" if s.get("augment") else None,
               f"{s['cells']} cells" if s.get("cells") else None]
    folds = s.get("folds_planned") or len(s.get("folds", [])) or "k"
    label = f"{name}, grouped {folds}-fold CV on BCCD cells ({', '.join(d for d in details if d)})"
    if s.get("complete") is False:
        label += f"; {s.get('folds_done', len(s.get('folds', [])))} of {folds} folds finished"
    return label.replace(" ()", "")


def backbone_speed(r: Results, backbone: str) -> tuple[str, str]:
    """Int8 per-crop latency at 1 / 2 threads and int8 size of a backbone, from backbones.json."""
    row_ = (r.backbones or {}).get("backbones", {}).get(backbone)
    if row_ is None:
        cell = not_measured(r.command("backbones"))
        return cell, cell
    return (f"{row_['int8_ms_1t']:.1f} / {row_['int8_ms_2t']:.1f} ms", mb(row_["int8_tflite_MB"]))


def reference_row(r: Results) -> str:
    b = r.reference
    kaggle = kaggle_cell(r)
    if b is None:
        missing = not_measured("make reference")
        return row(f"reference bundle (`{shown(r.reference_dir)}`)", "n/a", missing, "—", kaggle, "—", "—")
    prov = b.get("provenance") or {}
    backbone = prov.get("backbone") or (prov.get("train_config") or {}).get("backbone", "")
    metrics = b.get("metrics") or {}
    flt, q = metrics.get("float") or {}, metrics.get("int8") or {}
    label = (f"{NAMES.get(backbone, backbone)}, reference bundle (`{shown(r.reference_dir)}`): held-out BCCD cells "
             f"({flt.get('n', '?')}, one grouped {metrics.get('split', 'test')} split)")
    agreement = (b.get("gate") or {}).get("top1_agreement")
    int8 = f"{frac(q['accuracy'])} / {frac(q['macro_f1'])}" if q else "—"
    if agreement is not None:
        int8 += f"; int8/float top-1 agreement {pct(agreement)}"
    latency, _ = backbone_speed(r, backbone)
    size = mb(b["model_bytes"] / 1e6) if b.get("model_bytes") else "—"
    return row(label, "n/a",
               f"{frac(flt['accuracy'])} / {frac(flt['macro_f1'])}" if flt else "—", int8, kaggle, latency, size)


def kaggle_cell(r: Results) -> str:
    k = r.kaggle
    if k is None:
        return not_measured(r.command("kaggle"))
    cell = (f"{pct(k['accuracy'])} accuracy, macro-F1 {frac(k['macro_f1'])} ({k['images']:,} images; "
            f"{k['unidentified']} unidentified and {k['not_found']} with no cell found counted as errors); "
            f"{k['originals_correct']}/{k['originals']} originals by majority vote")
    if r.reference is not None and k.get("model") != shown(r.reference_dir):
        cell += f"; model `{k.get('model')}`"
    elif r.reference is not None and k.get("model_sha256") not in (None, r.reference.get("model_sha256")):
        cell += f"; measured with an earlier `{k.get('model')}` model (sha256 differs): rerun"
    if k.get("limit_per_class"):
        cell += f"; quick check, {k['limit_per_class']} images per class"
    return cell


def classifier_notes(r: Results) -> list[str]:
    notes = ["Accuracy and macro-F1 are fractions. CV: grouped cross-validation on BCCD cells "
             "(`benchmarks/cross_validate.py`; `make cv`), mean ± sd over folds; no group (field, or fields "
             "re-photographing one cell) is in two folds. The reference bundle is trained and tested on one "
             "grouped split (`make reference`); only it is run on Kaggle TEST."]
    k = r.kaggle
    if k is not None:
        training = k.get("training") or {}
        about = [f"bundle {k['bundle_name']}" if k.get("bundle_name") else None,
                 f"run {training['run']}" if training.get("run") else None,
                 f"{training['augment']} augmentation" if training.get("augment") else None,
                 training.get("description")]
        model = f"model `{k.get('model')}`" + (f" ({', '.join(a for a in about if a)})" if any(about) else "")
        if training.get("test_source"):
            notes.append(f"Kaggle TEST (`benchmarks/bench_kaggle_pipeline.py`, {model}): the BCCD fields its images were made "
                         f"from were held out of the model's training ({training['test_source']}); an image with no "
                         "cell found or an \"unidentified\" cell counts as an error.")
        else:
            notes.append(f"Kaggle TEST (`benchmarks/bench_kaggle_pipeline.py`, {model}) is not held-out: its images are "
                         "augmentations of BCCD fields, most of which the reference model trained on; an image with "
                         "no cell found or an \"unidentified\" cell counts as an error.")
    b = r.backbones
    if b is not None:
        notes.append(f"Latency and size (`benchmarks/bench_backbones.py`): random weights at "
                     f"{b.get('input_size', 224)} px, int8 TFLite, median of {b.get('invocations', '?')} "
                     f"single-crop calls on a {b.get('machine_cores', '?')}-core machine; the reference bundle's "
                     "size is its own model file.")
    return notes


# -- the cross-lab table --------------------------------------------------------------------------

CROSSLAB_ROWS = (("bccd_to_pbc", "pbc", "BCCD only", "every PBC cell (another lab)", 0.85),
                 ("pbc_to_bccd", "bccd", "PBC only", "every BCCD cell (another lab)", 0.85),
                 ("both", "pbc", "both labs (reference bundle)", "held-out PBC cells (same lab)", 0.95),
                 ("both", "bccd", "both labs (reference bundle)", "held-out BCCD fields (same lab, grouped)", 0.93))


def crosslab_table(r: Results) -> list[str]:
    c = r.crosslab
    if c is None:
        return ["Classification per laboratory: " + not_measured(r.command("crosslab")) + "."]
    lines = [f"Classification per laboratory (`benchmarks/crosslab.py`, commit {c.get('commit')}, {c.get('date')}; "
             "macro-F1 over the four classes both labs share unless said; int8 unless said):", "",
             "| trained on | tested on | cells | float macro-F1 | int8 macro-F1 | int8 accuracy "
             "| largest predicted / true share | target |", "|---|---|---|---|---|---|---|---|"]
    for name, lab, trained, tested, target in CROSSLAB_ROWS:
        f = ((c.get("directions") or {}).get(name) or {}).get("by_lab", {}).get(lab)
        if f is None:
            continue
        q, fl = f["int8"], f["float"]
        if name == "both":
            goal = f"accuracy >= {target}" if lab == "bccd" else f"macro-F1 >= {target} (all classes)"
            got = q["accuracy"] if lab == "bccd" else q["macro_f1"]
            scores = (f"{frac(fl['macro_f1'])} (all {len(q['classes'])} classes)", f"{frac(q['macro_f1'])} (all classes)")
        else:
            goal, got = f"macro-F1 >= {target}", q["shared_macro_f1"]
            scores = (frac(fl["shared_macro_f1"]), frac(q["shared_macro_f1"]))
        lines.append(row(trained, tested, str(q["n"]), *scores, frac(q["accuracy"]), f"{q['max_share_ratio']:.2f}",
                         f"{goal}: {'met' if got >= target else 'not met'}"))
    return lines + [""] + abstention_table(c) + txl_shares_table(c)


def abstention_table(c: dict) -> list[str]:
    """Per lab: the share of cells the int8 model gives a class, and how often that class is right."""
    rows = []
    for name, lab, trained, tested, _ in CROSSLAB_ROWS:
        f = ((c.get("directions") or {}).get(name) or {}).get("by_lab", {}).get(lab) or {}
        a = f.get("abstention")
        if a:
            own = name == "both"
            rows.append(row(trained, tested, pct(a["coverage"]), pct(a["selective_accuracy"]), pct(a["novel"]),
                            pct(a["unsure"]), "selective accuracy >= 95%" + ("; at most 10% unidentified" if own else "")
                            + ": " + ("met" if a["selective_accuracy"] >= 0.95 and (not own or a["coverage"] >= 0.90)
                                      else "not met")))
    if not rows:
        return []
    return ["Cells given a class (int8, after the \"unidentified\" rules: low confidence, or unlike the training "
            "cells):", "", "| trained on | tested on | given a class | right among those | unlike the training "
            "cells | unsure | target |", "|---|---|---|---|---|---|---|", *rows, ""]


def txl_shares_table(c: dict) -> list[str]:
    shares = c.get("txl_shares") or {}
    if not shares:
        return []
    intervals = c.get("reference_intervals") or {}
    classes = list(intervals)
    lines = ["Predicted shares on the unlabelled TXL-PBC fields (whole cells, device pipeline), beside the adult "
             "reference intervals; those fields were picked for detection, not as a differential:", "",
             "| model | lab | cells | " + " | ".join(f"{k} [{lo}-{hi}%]" for k, (lo, hi) in intervals.items())
             + " | unidentified |", "|---|---|---|" + "---|" * (len(classes) + 1)]
    for name, labs in shares.items():
        for lab, s in labs.items():
            cells = [f"{100 * s['shares'][k]:.0f}%" if s["shares"].get(k) is not None else "—" for k in classes]
            lines.append(row(name, lab, str(s["cells"]), *cells, str(s["unidentified"])))
    return lines


# -- the specimen flags table ---------------------------------------------------------------------

def flags_table(r: Results) -> list[str]:
    """Simulated 100-cell specimens (benchmarks/bench_flags.py): accuracy and how often a specimen is
    flagged outside_training, per bundle, lab and synthetic shift."""
    if not r.flags:
        return ["Specimen flags: " + not_measured("make results RERUN=flags") + "."]
    lines = ["Specimen flags on simulated 100-cell specimens (`benchmarks/bench_flags.py`; a training lab's "
             "cells are its held-out ones; shifts are applied to those fields):", "",
             "| model | lab | condition | accuracy | right among cells given a class | given a class "
             "| specimens flagged outside_training | target |", "|---|---|---|---|---|---|---|---|"]
    for name, f in r.flags.items():
        for x in f.get("rows") or []:
            selective = pct(x["selective_accuracy"]) if x.get("selective_accuracy") is not None else "—"
            lines.append(row(f"`{f.get('bundle')}`", x["lab"], x["condition"], frac(x["accuracy"]), selective,
                             pct(x["coverage"]), pct(x["outside_training"]), x.get("target", "-")))
    return lines


# -- the device targets table ---------------------------------------------------------------------

def targets_table(r: Results) -> list[str]:
    lines = ["| measure | target | measured |", "|---|---|---|"]
    d, p = r.detection, r.pipeline
    split = (d or {}).get("split", "val")
    detection_cmd = not_measured(r.command("detection"))
    pipeline_cmd = not_measured(r.command("pipeline"))
    if d is not None and d.get("txl_pbc"):
        labs = d["txl_pbc"]
        met = all(meets(f) for f in labs.values())
        cell = ", ".join(f"{lab} {frac(f['recall'])} / {frac(f['precision'])}" for lab, f in labs.items())
        cell += f" ({'met' if met else 'not met'}){limited(d)}"
    else:
        cell = detection_cmd
    lines.append(row(f"white-cell detection, TXL-PBC {split}, IoU >= 0.5, recall / precision "
                     "(`benchmarks/bench_detection.py`)", ">= 0.98 / >= 0.95 per lab", cell))
    speed = (d or {}).get("speed")
    cell = (f"{speed['median_ms']:.1f} ms median, {speed['p95_ms']:.1f} ms 95th percentile "
            f"({speed['fields']} BCCD fields x {speed.get('repeats', 3)})" if speed else detection_cmd)
    lines.append(row("segmentation per 640x480 field", "<= 10 ms", cell))
    fields = p["fields"] if p else 100
    if p is not None:
        rows = p["rows"]
        ratios = " / ".join(f"{x['pipeline_over_classifier']:.2f}" if x.get("pipeline_over_classifier") is not None
                            else "n/a" for x in rows)
        per_cell = " / ".join(f"{x['classify_ms_per_cell']:.1f}" if x.get("classify_ms_per_cell") is not None
                              else "n/a" for x in rows)
        threads = " / ".join(str(x["threads"]) for x in rows)
        cell = (f"{ratios} ({threads} threads; {rows[0]['cells']} cells in {rows[0]['fields']} fields: segmentation "
                f"{rows[0]['segment_ms_median']:.1f} ms vs {per_cell} ms per cell)")
    else:
        cell = pipeline_cmd
    lines.append(row(f"whole pipeline / classifier time, {fields} BCCD fields (`benchmarks/bench_pipeline.py`)",
                     "<= 1.5", cell))
    lines.append(row(f"peak RSS of `count` over {fields} fields", "<= 250 MB",
                     f"{p['peak_rss_mb']:.0f} MB" if p is not None else pipeline_cmd))
    s = r.scan
    cell = (f"{s['frames']:,} frames: {s['counted_once']} of {s['whole_cells']} whole cells counted once, "
            f"{s['double_counts']} double counts; {s['jumps']} jumps, {s['relocalised']} relocalised"
            if s is not None else not_measured(r.command("scan")))
    scan_cmd = f"`{s['command']}`" if s and s.get("command") else "`benchmarks/bench_scan.py --runs 4`"
    lines.append(row(f"count-once on simulated scans ({scan_cmd})", "no double counts, >= 98% counted", cell))
    lines += device_latency_rows(r)
    b = r.reference
    lines.append(row("int8 model size", "<= 6 MB", f"{mb(b['model_bytes'] / 1e6)} (`{shown(r.reference_dir)}`)"
                     if b is not None and b.get("model_bytes") else not_measured("make reference")))
    lines.append(daemon_row(r.daemon, r.command("daemon"), {"minutes": 30, "fps": 5}))
    return lines + web_rows(r)


def daemon_row(m: dict | None, command: str, default: dict, web: bool = False) -> str:
    """The daemon's RSS over a replay (bench_daemon_memory.py; `web`: with --web, the page watched and used)."""
    cell = (f"{m['start_mb']:.1f} MB at start, {m['end_mb']:.1f} MB at end, max {m['max_mb']:.1f}; "
            f"first / last third {m['first_third_mb']:.1f} / {m['last_third_mb']:.1f} MB"
            if m is not None else not_measured(command))
    s = (m or {}).get("settings") or default
    options = f"--minutes {s['minutes']:g} --fps {s['fps']:g}"
    if web:
        options = f"--web {options} --target {s['target']:g}"
    label = f"daemon RSS over a {s['minutes']:g}-minute replay" + (
        " with the web page watched and each report reviewed and signed" if web else "")
    return row(f"{label} (`benchmarks/bench_daemon_memory.py {options}`)", "<= 250 MB, no growth", cell + page_use(m))


def page_use(m: dict | None) -> str:
    """What the page was asked and did during a daemon_web run."""
    use = (m or {}).get("web")
    if not use:
        return ""
    return (f"; the page served {use['status']:,} status and {use['frames']:,} frame requests, "
            f"{use['reclassified']} cells reclassified, {use['signed']} reports signed, {use['errors']} failed requests")


def web_rows(r: Results) -> list[str]:
    """The web page's cost: the frame loop's rate with the page served and watched against off (bench_web.py),
    and the daemon's RSS with the page watched and each report reviewed and signed."""
    w = r.web
    cases = {c.get("key"): c for c in (w or {}).get("cases", [])}
    settings = (w or {}).get("settings") or {"seconds": 45, "repeat": 3}
    command = f"benchmarks/bench_web.py --seconds {settings['seconds']:g} --repeat {settings['repeat']}"
    if {"off", "unwatched", "watched"} <= set(cases):
        off, idle, watched = cases["off"], cases["unwatched"], cases["watched"]
        cell = (f"{watched['fps_vs_web_off']:.2f} watched, {idle['fps_vs_web_off']:.2f} served unwatched (median "
                f"of {settings['repeat']} rounds; {off['fps']:.1f} / {idle['fps']:.1f} / {watched['fps']:.1f} "
                f"frames/s off / unwatched / watched); peak RSS {off['peak_rss_mb']:.0f} / {idle['peak_rss_mb']:.0f} "
                f"/ {watched['peak_rss_mb']:.0f} MB")
    else:
        cell = not_measured(r.command("web"))
    watched_by = f"{settings.get('pollers', 1)} live page(s) and 10 requests/s"
    lines = [row(f"frame rate with the web page watched ({watched_by}) / web page off (`{command}`)",
                 "the frame loop never waits on the page", cell)]
    lines.append(daemon_row(r.daemon_web, r.command("web"), {"minutes": 10, "fps": 5, "target": 20}, web=True))
    return lines


def device_latency_rows(r: Results) -> list[str]:
    """The reference bundle's per-crop times against the plain int8 Lite0 of the same run."""
    d = (r.backbones or {}).get("device")
    if not d or "model_ratio_to_plain_int8_1t" not in d:
        cell = not_measured("make results RERUN=backbones")
        return [row("int8 model with its feature output / plain int8 Lite0, per crop", "<= 1.10", cell),
                row("whole per-crop classification on the device / plain int8 Lite0", "<= 1.20", cell)]
    model = " / ".join(f"{d[f'model_ratio_to_plain_int8_{t}t']:.2f}" for t in (1, 2))
    device = " / ".join(f"{d[f'device_ratio_to_plain_int8_{t}t']:.2f}" for t in (1, 2))
    return [row("int8 model with its feature output / plain int8 Lite0, per crop (`benchmarks/bench_backbones.py`)",
                "<= 1.10", f"{model} (1 / 2 threads; {d['model_ms_1t']:.1f} / {d['model_ms_2t']:.1f} ms)"),
            row("whole per-crop classification on the device (colour standardisation, model, softmax, novelty) "
                "/ plain int8 Lite0", "<= 1.20",
                f"{device} (1 / 2 threads; {d['device_ms_1t']:.1f} / {d['device_ms_2t']:.1f} ms)")]


def meets(f: dict) -> bool:
    return f["recall"] >= DETECTION_TARGET[0] and f["precision"] >= DETECTION_TARGET[1]


def limited(d: dict) -> str:
    return f"; quick check, first {d['limit']} fields of each set" if d.get("limit") else ""


# -- the detection table --------------------------------------------------------------------------

def detection_table(r: Results) -> list[str]:
    d = r.detection
    if d is None:
        return ["White-cell detection per lab: " + not_measured(r.command("detection")) + "."]
    lines = [f"White-cell detection per lab (`benchmarks/bench_detection.py`): every detection, edge-cut cells "
             f"included, matched one-to-one to the annotated boxes at IoU >= 0.5, and by centre-in-box; pixel size "
             f"estimated per {d.get('pixel_size', 'field')}{limited(d)}.",
             "",
             "| set | lab | fields | WBC | detections | recall / precision | centre-in-box recall / precision "
             "| recall without annotation artefacts | target >= 0.98 / >= 0.95 |",
             "|---|---|---|---|---|---|---|---|---|"]
    sets = ((f"TXL-PBC {d.get('split', 'val')}", d.get("txl_pbc") or {}), ("BCCD (VOC boxes)", d.get("bccd_voc") or {}))
    for name, labs in sets:
        for lab, f in labs.items():
            without = f.get("recall_without_artefacts")
            lines.append(row(name, lab, str(f["fields"]), str(f["wbc"]), str(f["detections"]),
                             f"{frac(f['recall'])} / {frac(f['precision'])}",
                             f"{frac(f['centre_recall'])} / {frac(f['centre_precision'])}",
                             frac(without) if without is not None else "—", "met" if meets(f) else "not met"))
    return lines


# -- assembling -----------------------------------------------------------------------------------

def provenance_line(r: Results) -> list[str]:
    """Where and when each file read was measured (benchmarks/provenance.py), or nothing when none was read."""
    if not r.read:
        return []
    def measured(data: dict) -> str:
        if not data.get("commit") and not data.get("date"):
            return "commit, cores and date not recorded"
        return f"commit {data.get('commit') or 'unknown'}, {data.get('cores', '?')} cores, {data.get('date') or 'date unknown'}"
    return ["Measured: " + "; ".join(f"`{name}` {measured(data)}" for name, data in r.read.items()) + ".", ""]


def row(*cells: str) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def render(r: Results) -> str:
    parts = [classifier_table(r), [""], [f"- {n}" for n in classifier_notes(r)], [""], crosslab_table(r), [""],
             flags_table(r), [""],
             targets_table(r), [""],
             detection_table(r), [""], provenance_line(r),
             [f"Generated by `benchmarks/results_table.py --results {shown(r.dir)}` (`make results`)."]]
    return "\n".join(line for part in parts for line in part) + "\n"


def replace_between_markers(text: str, block: str, name: str = "README") -> str:
    """`text` with what lies between the begin and end markers replaced by `block` (set off by blank
    lines); the markers and everything outside them are kept as they are."""
    begins, ends = text.count(BEGIN), text.count(END)
    if begins != 1 or ends != 1:
        raise ResultsError(f"{name}: needs exactly one '{BEGIN}' and one '{END}' line around the results "
                           f"tables (found {begins} and {ends}); add them where the tables go")
    start, stop = text.index(BEGIN), text.index(END)
    if stop < start:
        raise ResultsError(f"{name}: '{END}' comes before '{BEGIN}'")
    # Blank lines around the block: a table right after an HTML comment line is not a table everywhere.
    return text[:start + len(BEGIN)] + "\n\n" + block.strip("\n") + "\n\n" + text[stop:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True, help="folder of the benchmarks' JSON files")
    parser.add_argument("--cv", type=Path, action="append", default=[], metavar="SUMMARY",
                        help="a cross_validate.py summary.json besides RESULTS/cv_*.json (repeatable)")
    parser.add_argument("--reference", type=Path, default=REPO / "models" / "reference",
                        help="the reference bundle folder (default models/reference)")
    parser.add_argument("--readme", type=Path, help="replace the text between the results markers in this file")
    args = parser.parse_args(argv)
    try:
        block = render(Results(args.results, args.cv, args.reference))
        if args.readme:
            if not args.readme.is_file():
                raise ResultsError(f"{args.readme}: no such file")
            args.readme.write_text(replace_between_markers(args.readme.read_text(), block, str(args.readme)))
            print(f"{args.readme}: results tables replaced", file=sys.stderr)
    except ResultsError as err:
        print(f"results_table.py: error: {err}", file=sys.stderr)
        return 1
    print(block, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
