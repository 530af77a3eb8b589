"""Grouped 5-fold cross-validation of a backbone on BCCD cells: float and int8 accuracy and macro-F1.

Prints figures (mean and standard deviation over folds); not a test. Resumable: finished folds are
kept under --out and not trained again. Run from the repository root, e.g.
    .venv/bin/python benchmarks/cross_validate.py --backbone efficientnet_lite0 --out runs/cv_lite0
Every fold uses the reference recipe (see the Makefile's `reference` target). No group (field, or
fields re-photographing one cell) is in two folds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = dict(head_lr=5e-3, head_epochs=15, finetune_lr=3e-4, finetune_epochs=30, finetune_fraction=0.5,
              patience=8, augment="geometric")


def run_fold(fold: int, test_groups: set, data, args) -> dict:
    from hematovision.export.bundle import ExportOptions, export_run
    from hematovision.export.gate import GateMargins
    from hematovision.train.recipe import RunPaths, TrainConfig, prepare_run, train

    run = RunPaths(args.out / f"fold{fold}")
    bundle = args.out / f"fold{fold}_bundle"
    if not run.config.is_file():
        recipe = dict(RECIPE, augment=args.augment)
        config = TrainConfig(backbone=args.backbone, weights=args.weights, seed=fold, **recipe).validate()
        prepare_run(run, config, data, test_groups)
    train(run)
    if not (bundle / "bundle.json").is_file():
        # The gate is opened here: cross-validation reports int8 figures whether or not they pass.
        export_run(run.root, bundle, ExportOptions(margins=GateMargins(100.0, 100.0)))
    metrics = json.loads((bundle / "bundle.json").read_text())["metrics"]
    return {kind: {"accuracy": metrics[kind]["accuracy"], "macro_f1": metrics[kind]["macro_f1"]}
            for kind in ("float", "int8")}


def main() -> int:
    from hematovision.train.datasets import load_bccd
    from hematovision.train.splits import grouped_folds

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--bccd", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--augment", default=RECIPE["augment"], choices=("full", "stain", "geometric", "none"))
    parser.add_argument("--centres", default="boxes", choices=("boxes", "segmenter"),
                        help="crop at the annotated box centres or where the device's segmenter finds each cell")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    data = load_bccd(args.bccd)
    if args.centres == "segmenter":
        from hematovision.train.device_crops import recentre_on_segmenter

        data = recentre_on_segmenter(data)
    folds = grouped_folds(data.samples, args.folds, seed=0)
    results = []
    for k in range(args.folds):
        test_groups = {s.group for s, f in zip(data.samples, folds) if f == str(k)}
        results.append(run_fold(k, test_groups, data, args))
        print(f"fold {k}: {json.dumps(results[-1])}", flush=True)
    for kind in ("float", "int8"):
        for key in ("accuracy", "macro_f1"):
            values = [r[kind][key] for r in results]
            print(f"{args.backbone} ({args.centres} centres, {args.augment} augmentation) {kind} {key}: mean {statistics.mean(values):.4f} "
                  f"sd {statistics.stdev(values) if len(values) > 1 else 0:.4f} over {len(values)} folds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
