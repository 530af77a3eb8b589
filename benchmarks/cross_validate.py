"""Grouped 5-fold cross-validation of a backbone on BCCD cells: float and int8 accuracy and macro-F1.

Prints figures (mean and standard deviation over folds); not a test. Resumable: finished folds are
kept under --out and not trained again. Run from the repository root, e.g.
    .venv/bin/python benchmarks/cross_validate.py --backbone efficientnet_lite0 --out runs/cv_lite0
Every fold uses the reference recipe (see the Makefile's `reference` target). No group (field, or
fields re-photographing one cell) is in two folds.

At the end OUT/summary.json holds the settings, each fold's float and int8 accuracy and macro-F1,
and their mean and sd. `--summary-only` rebuilds it from the folds already finished
(OUT/foldK_bundle/bundle.json) without loading data or training anything:
    .venv/bin/python benchmarks/cross_validate.py --summary-only --out runs/cv_lite0
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
from pathlib import Path

from provenance import write_result

REPO = Path(__file__).resolve().parents[1]
# The reference bundle's recipe (`make reference`), so the folds measure the model that ships.
RECIPE = dict(head_lr=5e-3, head_epochs=15, finetune_lr=3e-4, finetune_epochs=60, finetune_fraction=1.0,
              patience=15, augment="stain")


def run_fold(fold: int, test_groups: set, data, args) -> dict:
    from hematovision.export.bundle import ExportOptions, export_run
    from hematovision.export.gate import OPEN
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
        export_run(run.root, bundle, ExportOptions(margins=OPEN))
    return fold_result(bundle / "bundle.json")


def fold_result(bundle_json: Path) -> dict:
    """A fold's float and int8 accuracy and macro-F1 (and test cells, where the bundle says)."""
    metrics = json.loads(bundle_json.read_text())["metrics"]
    out = {kind: {"accuracy": metrics[kind]["accuracy"], "macro_f1": metrics[kind]["macro_f1"]}
           for kind in ("float", "int8")}
    if "n" in metrics["float"]:
        out["cells"] = metrics["float"]["n"]
    return out


def finished_folds(out: Path) -> dict[int, Path]:
    """{fold number: bundle.json} of the folds whose bundle is written, in fold order."""
    found = {}
    for path in out.glob("fold*_bundle/bundle.json"):
        match = re.fullmatch(r"fold(\d+)_bundle", path.parent.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def settings(out: Path, folds: dict[int, Path], args) -> dict:
    """Backbone, weights, augmentation and crop centres of the folds: what the fold bundles and runs
    record (provenance, data sources), else the command-line options."""
    found = {"backbone": args.backbone, "weights": args.weights, "augment": args.augment,
             "centres": args.centres}
    for k, path in folds.items():
        provenance = json.loads(path.read_text()).get("provenance") or {}
        config = provenance.get("train_config") or {}
        for key in ("backbone", "weights", "augment"):
            found[key] = config.get(key) or provenance.get(key) or found[key]
        sources = list(provenance.get("sources") or [])
        data_json = out / f"fold{k}" / "data.json"
        if data_json.is_file():
            sources += json.loads(data_json.read_text()).get("sources") or []
        if sources:
            found["centres"] = "segmenter" if any("segmenter centres" in s for s in sources) else "boxes"
        break
    return found


def summarise(out: Path, folds_planned: int, results: dict[int, dict], found: dict) -> dict:
    """The summary written to OUT/summary.json: settings, per-fold figures, mean and sd over folds
    (sample sd; 0 for one fold)."""
    summary = {**found, "folds_planned": folds_planned, "folds_done": len(results),
               "complete": len(results) >= folds_planned,
               "folds": [{"fold": k, **r} for k, r in results.items()], "mean": {}, "sd": {}}
    if all("cells" in r for r in results.values()) and results:
        summary["cells"] = sum(r["cells"] for r in results.values())
    for kind in ("float", "int8"):
        summary["mean"][kind], summary["sd"][kind] = {}, {}
        for key in ("accuracy", "macro_f1"):
            values = [r[kind][key] for r in results.values()]
            summary["mean"][kind][key] = statistics.mean(values) if values else None
            summary["sd"][kind][key] = statistics.stdev(values) if len(values) > 1 else 0.0
    write_result(out / "summary.json", summary)
    return summary


def print_summary(summary: dict) -> None:
    for kind in ("float", "int8"):
        for key in ("accuracy", "macro_f1"):
            print(f"{summary['backbone']} ({summary['centres']} centres, {summary['augment']} augmentation) "
                  f"{kind} {key}: mean {summary['mean'][kind][key]:.4f} sd {summary['sd'][kind][key]:.4f} "
                  f"over {summary['folds_done']} folds")


def summary_only(args) -> int:
    folds = finished_folds(args.out)
    if not folds:
        print(f"cross_validate.py: no finished fold under {args.out} (looked for foldK_bundle/bundle.json)",
              file=sys.stderr)
        return 1
    results = {k: fold_result(path) for k, path in folds.items()}
    summary = summarise(args.out, max(args.folds, max(folds) + 1), results, settings(args.out, folds, args))
    for k, r in results.items():
        print(f"fold {k}: {json.dumps(r)}")
    print_summary(summary)
    print(f"summary of {summary['folds_done']} of {summary['folds_planned']} folds written to "
          f"{args.out / 'summary.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--bccd", type=Path, default=REPO.parent / "shared" / "data" / "bccd")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--augment", default=RECIPE["augment"], choices=("full", "stain", "geometric", "none"))
    parser.add_argument("--centres", default="boxes", choices=("boxes", "segmenter"),
                        help="crop at the annotated box centres or where the device's segmenter finds each cell")
    parser.add_argument("--summary-only", action="store_true",
                        help="only rebuild OUT/summary.json from the finished folds; trains nothing")
    args = parser.parse_args(argv)
    if args.summary_only:
        return summary_only(args)

    from hematovision.train.datasets import load_bccd
    from hematovision.train.splits import grouped_folds

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    data = load_bccd(args.bccd)
    if args.centres == "segmenter":
        from hematovision.train.device_crops import recentre_on_segmenter

        data = recentre_on_segmenter(data)
    folds = grouped_folds(data.samples, args.folds, seed=0)
    results = {}
    found = {"backbone": args.backbone, "weights": args.weights, "augment": args.augment, "centres": args.centres}
    for k in range(args.folds):
        test_groups = {s.group for s, f in zip(data.samples, folds) if f == str(k)}
        results[k] = run_fold(k, test_groups, data, args)
        print(f"fold {k}: {json.dumps(results[k])}", flush=True)
    print_summary(summarise(args.out, args.folds, results, found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
