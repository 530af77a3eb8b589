"""Cross-lab evaluation: figures per laboratory, float and int8, on labs a model has or has not seen.

Prints figures (not a test) and writes them with --json. Resumable: runs are kept under --out and
not trained again. From the repository root (needs ../shared/data; about an hour on 2 cores):

    .venv/bin/python benchmarks/crosslab.py --out runs/crosslab --json benchmarks/results/crosslab.json

- bccd_to_pbc: trained on BCCD cells only (grouped train / val), tested on every PBC cell of the four
  classes both labs share (neutrophil, lymphocyte, monocyte, eosinophil).
- pbc_to_bccd: trained on PBC cells of those four classes only, tested on every BCCD cell.
- both: the reference bundle (`--reference`, trained on both labs by `make reference`) on its own
  held-out split, per lab: grouped BCCD fields and a held-out share of PBC (the same lab it trained
  on, so a same-lab figure).
Each lab gets macro-F1, accuracy, per-class recall, a confusion matrix (PNG under --out) and the
largest ratio of a class's predicted share to its true share (a lab where one class takes twice its
share is wrong). On the unlabelled TXL-PBC labs each bundle's predicted class shares are printed
beside the adult reference intervals as a sanity check; those fields were picked for detection,
not as a differential, so only a share far outside every interval is a finding.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from provenance import provenance, repo_path, write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SHARED = ("neutrophil", "lymphocyte", "monocyte", "eosinophil")
# Adult reference intervals of the differential, percent of white cells.
REFERENCE_INTERVALS = {"neutrophil": (40, 75), "lymphocyte": (20, 45), "monocyte": (2, 10),
                       "eosinophil": (1, 6), "basophil": (0, 2)}
TXL_LABS = {(480, 640): "BCCD", (416, 416): "BCDD", (363, 360): "PBC", (369, 366): "PBC", (575, 575): "Raabin"}

logger = logging.getLogger("crosslab")


@dataclass(frozen=True)
class Direction:
    """One leave-one-lab-out experiment: train on one lab, test on every cell of another."""

    name: str
    train_lab: str
    test_lab: str
    head_epochs: int
    finetune_epochs: int
    patience: int
    head_lr: float
    finetune_lr: float


# BCCD has about 290 training cells: the reference recipe's long schedule. PBC has about 1,400:
# fewer, longer epochs reach the same number of steps.
DIRECTIONS = (
    Direction("bccd_to_pbc", "bccd", "pbc", 15, 60, 15, 5e-3, 3e-4),
    Direction("pbc_to_bccd", "pbc", "bccd", 4, 16, 5, 3e-3, 2e-4),
)


def load_labs(data: Path, classes):
    """BCCD cells cut where the device's segmenter finds them, and PBC cells located as the device does."""
    from hematovision.train.datasets import load_bccd, load_cell_images
    from hematovision.train.device_crops import recentre_on_segmenter

    both = recentre_on_segmenter(load_bccd(data / "bccd", classes))
    both.extend(load_cell_images(data / "pbc", classes))
    return both


def train_direction(d: Direction, data, out: Path, augment: str, colour: str) -> Path:
    """Train (or resume) one direction; export it with the gate open; returns the bundle folder."""
    from hematovision.export.bundle import ExportOptions, export_run
    from hematovision.export.gate import OPEN
    from hematovision.train.datasets import lab_of
    from hematovision.train.recipe import RunPaths, TrainConfig, prepare_run, train

    run, bundle = RunPaths(out / d.name), out / f"{d.name}_bundle"
    if not run.config.is_file():
        config = TrainConfig(backbone="efficientnet_lite0", weights="imagenet", classes=SHARED,
                             head_epochs=d.head_epochs, finetune_epochs=d.finetune_epochs, finetune_fraction=1.0,
                             head_lr=d.head_lr, finetune_lr=d.finetune_lr, patience=d.patience,
                             augment=augment, colour=colour).validate()
        test_groups = {s.group for s in data.samples if lab_of(s) == d.test_lab}
        prepare_run(run, config, data, test_groups, f"every {d.test_lab} cell")
    train(run)
    if not (bundle / "bundle.json").is_file():
        export_run(run.root, bundle, ExportOptions(margins=OPEN))
    return bundle


def share_ratio(confusion) -> float:
    """Largest predicted share / true share over the classes present (1.0 is a faithful differential)."""
    cm = np.asarray(confusion, float)
    true, predicted = cm.sum(1), cm.sum(0)
    present = true > 0
    return float((predicted[present] / true[present]).max()) if present.any() else float("nan")


def lab_figures(metrics: dict, folder: Path, title: str) -> dict:
    """The figures of one lab's metrics dict (float and int8), with confusion PNGs written to `folder`."""
    from hematovision.train.evaluate import Metrics, write_report

    out = {}
    for kind in ("float", "int8"):
        m = metrics[kind]
        write_report(Metrics.from_dict(m), folder / kind, f"{title}, {kind}")
        out[kind] = {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "recall": {c: v["recall"] for c, v in m["per_class"].items() if v["support"]},
                     "confusion_matrix": m["confusion_matrix"], "classes": m["classes"],
                     "max_share_ratio": share_ratio(m["confusion_matrix"])}
    return out


def bundle_figures(bundle: Path, out: Path, name: str, shared_only: bool) -> dict:
    """Per-lab figures of a bundle's held-out split (bundle.json metrics.by_lab)."""
    meta = json.loads((bundle / "bundle.json").read_text())
    by_lab = meta["metrics"].get("by_lab")
    if not by_lab:
        raise SystemExit(f"{bundle}: bundle.json has no per-lab metrics; export it again with this version")
    figures = {lab: lab_figures(m, out / "confusion" / f"{name}_{lab}", f"{name} on {lab}") for lab, m in by_lab.items()}
    if shared_only:
        for lab in figures:
            for kind in ("float", "int8"):
                figures[lab][kind]["shared_macro_f1"] = shared_macro_f1(by_lab[lab][kind])
    abstention = (meta.get("abstention") or {}).get("test_by_lab") or {}
    for lab in figures:
        figures[lab]["abstention"] = abstention.get(lab)  # None for a bundle without novelty figures
    return figures


def shared_macro_f1(m: dict) -> float:
    """Macro-F1 over the four classes both labs share (those with held-out cells)."""
    values = [m["per_class"][c]["f1"] for c in SHARED if c in m["per_class"] and m["per_class"][c]["support"]]
    return float(np.mean(values)) if values else float("nan")


def txl_shares(bundle_path: Path, txl: Path) -> dict:
    """Each TXL-PBC lab's predicted class shares (whole cells, device pipeline, running pixel size)."""
    from hematovision.classes import UNIDENTIFIED, differential_classes
    from hematovision.edge.vision.model_bundle import load_bundle
    from hematovision.edge.vision.pipeline import FieldPipeline
    from hematovision.pixels import read_rgb

    bundle = load_bundle(bundle_path)
    by_lab: dict[str, list[Path]] = {}
    for path in sorted(txl.glob("images/*/*.jpg")):
        shape = read_rgb(path).shape[:2]
        by_lab.setdefault(TXL_LABS.get(shape, f"{shape[1]}x{shape[0]}"), []).append(path)
    out = {}
    for lab, paths in sorted(by_lab.items()):
        pipeline, labels = FieldPipeline(bundle), Counter()
        for path in paths:
            result = pipeline.process(read_rgb(path), path.name)
            labels.update(c.prediction.label for c in result.cells)
        counted = sum(labels[c] for c in differential_classes(bundle.classes))
        out[lab] = {"fields": len(paths), "cells": sum(labels.values()), "unidentified": labels[UNIDENTIFIED],
                    "shares": {c: labels[c] / counted if counted else None for c in differential_classes(bundle.classes)},
                    "other": {c: labels[c] for c in bundle.classes if c not in differential_classes(bundle.classes)}}
    return out


def print_lab(name: str, lab: str, f: dict) -> None:
    for kind in ("float", "int8"):
        k = f[kind]
        shared = f" (four shared classes {k['shared_macro_f1']:.3f})" if "shared_macro_f1" in k else ""
        recall = ", ".join(f"{c} {v:.2f}" for c, v in k["recall"].items())
        print(f"{name:12s} {lab:5s} {kind:5s} n={k['n']:4d} accuracy {k['accuracy']:.3f} macro-F1 "
              f"{k['macro_f1']:.3f}{shared}; largest predicted/true share {k['max_share_ratio']:.2f}; recall {recall}")
    a = f.get("abstention")
    if a:
        print(f"{name:12s} {lab:5s} int8 with abstention: {100 * a['coverage']:.1f}% of cells given a class, "
              f"{100 * a['selective_accuracy']:.1f}% of those right; {100 * a['novel']:.1f}% unlike the training "
              f"cells ({100 * a['novel_among_wrong']:.1f}% of the wrong ones), {100 * a['unsure']:.1f}% unsure")


def print_shares(name: str, shares: dict) -> None:
    for lab, s in shares.items():
        parts = []
        for c, v in s["shares"].items():
            lo, hi = REFERENCE_INTERVALS.get(c, (None, None))
            ref = f" [{lo}-{hi}]" if lo is not None else ""
            parts.append(f"{c} {100 * v:.0f}%{ref}" if v is not None else f"{c} -")
        print(f"{name:12s} TXL {lab:6s} {s['cells']:4d} cells, {s['unidentified']} unidentified: {', '.join(parts)}"
              + (f"; beside: {s['other']}" if s["other"] else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="the shared datasets folder (bccd/, pbc/, txl_pbc/)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "crosslab", help="runs and confusion PNGs")
    parser.add_argument("--reference", type=Path, default=REPO / "models" / "reference",
                        help="the both-lab bundle to measure per lab (default models/reference)")
    parser.add_argument("--directions", default="bccd_to_pbc,pbc_to_bccd,both",
                        help="comma-separated: bccd_to_pbc, pbc_to_bccd, both")
    parser.add_argument("--augment", default="crosslab", help="augmentation of the leave-one-lab-out runs")
    parser.add_argument("--colour", default="reinhard", help="colour standardisation of the leave-one-lab-out runs")
    parser.add_argument("--no-txl", action="store_true", help="skip the TXL-PBC class shares")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if not (args.data / "pbc").is_dir() or not (args.data / "bccd").is_dir():
        print(f"crosslab.py: {args.data} lacks bccd/ or pbc/; give --data", file=sys.stderr)
        return 2
    wanted = [w.strip() for w in args.directions.split(",") if w.strip()]
    result = {**provenance(), "settings": {"augment": args.augment, "colour": args.colour}, "directions": {},
              "txl_shares": {}, "reference_intervals": REFERENCE_INTERVALS}
    data = load_labs(args.data, SHARED) if any(w != "both" for w in wanted) else None
    for d in DIRECTIONS:
        if d.name in wanted:
            bundle = train_direction(d, data, args.out, args.augment, args.colour)
            result["directions"][d.name] = {"train": d.train_lab, "test": d.test_lab, "bundle": repo_path(bundle),
                                            "by_lab": bundle_figures(bundle, args.out, d.name, True)}
    if "both" in wanted:
        result["directions"]["both"] = {"train": "bccd+pbc", "test": "held-out bccd fields and pbc cells",
                                        "bundle": repo_path(args.reference),
                                        "by_lab": bundle_figures(args.reference, args.out, "both", True)}
    for name, r in result["directions"].items():
        for lab, f in r["by_lab"].items():
            print_lab(name, lab, f)
    if not args.no_txl and (args.data / "txl_pbc").is_dir():
        for name, r in result["directions"].items():
            result["txl_shares"][name] = txl_shares(REPO / r["bundle"], args.data / "txl_pbc")
            print_shares(name, result["txl_shares"][name])
    if args.json:
        write_result(args.json, result)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
