"""The whole device pipeline on the Kaggle TEST fields: segment, take the labelled cell, classify.

Prints figures; not a test. Run from the repository root:
    .venv/bin/python benchmarks/bench_kaggle_pipeline.py --model BUNDLE [--split TEST] [--limit N] [--json FILE]
Each Kaggle image is a field (320x240, half the BCCD resolution) with one labelled white cell
near its centre. The cell found nearest the centre is classified; an image where no cell is found
counts as an error. TEST holds augmentations of only about 71 originals, so the figures are also
given per original (majority vote), the honest sample size. `--json FILE` also writes the printed
figures, the model and its training as one JSON object (read by benchmarks/results_table.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from provenance import write_result

REPO = Path(__file__).resolve().parents[1]
KAGGLE = REPO.parent / "shared" / "data" / "kaggle_blood_cells" / "images"


def nearest_to_centre(seg, width: int, height: int):
    cells = seg.cells or seg.edge_cells
    if not cells:
        return None
    centre = np.array([width / 2, height / 2])
    return min(cells, key=lambda c: float(np.linalg.norm(np.array(c.center) - centre)))


def classify_field(pipeline, image):
    from hematovision.edge.vision.classify import classify_crops, cut_cells

    seg = pipeline.detect(pipeline.prepare(image))
    cell = nearest_to_centre(seg, image.shape[1], image.shape[0])
    if cell is None:
        return "no cell found"
    crops = cut_cells(image, [cell.center], seg.um_per_pixel, pipeline.bundle)
    return classify_crops(pipeline.bundle, crops)[0].label


def main() -> int:
    from hematovision.classes import parse_label
    from hematovision.edge.vision.model_bundle import load_bundle
    from hematovision.edge.vision.pipeline import FieldPipeline
    from hematovision.pixels import read_rgb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference")
    parser.add_argument("--split", default="TEST")
    parser.add_argument("--limit", type=int, default=0, help="images per class (0: all)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")
    args = parser.parse_args()
    pipeline = FieldPipeline(load_bundle(args.model))
    outcomes, by_original = Counter(), defaultdict(Counter)
    for folder in sorted((KAGGLE / args.split).iterdir()):
        truth = parse_label(folder.name, str(folder))
        paths = sorted(folder.glob("*.jpeg"))[: args.limit or None]
        for path in paths:
            label = classify_field(pipeline, read_rgb(path))
            outcomes[(truth, label)] += 1
            original = re.match(r"^_(\d+)_", path.name).group(1)
            by_original[(truth, original)][label] += 1
    result = figures(outcomes, by_original, pipeline.bundle.classes)
    report(result)
    if args.json:
        result = {"model": shown_path(args.model), **model_description(args.model), "split": args.split,
                  "limit_per_class": args.limit, **result}
        write_result(args.json, result)
    return 0


def figures(outcomes: Counter, by_original: dict, classes) -> dict:
    """The benchmark's figures: accuracy, per-class recall and precision, macro-F1, the images
    with no cell found or left unidentified (both count as errors), majority vote per original."""
    total = sum(outcomes.values())
    correct = sum(n for (t, p), n in outcomes.items() if t == p)
    per_class, f1 = {}, []
    for c in classes:
        tp = outcomes[(c, c)]
        fn = sum(n for (t, p), n in outcomes.items() if t == c and p != c)
        fp = sum(n for (t, p), n in outcomes.items() if p == c and t != c)
        if tp + fn:
            f1.append(2 * tp / max(2 * tp + fp + fn, 1))
            per_class[c] = {"n": tp + fn, "recall": tp / (tp + fn), "precision": tp / max(tp + fp, 1)}
    votes = [(t, v.most_common(1)[0][0]) for (t, _), v in by_original.items()]
    return {"images": total, "correct": correct, "accuracy": correct / total if total else None,
            "macro_f1": float(np.mean(f1)) if f1 else None, "per_class": per_class,
            "not_found": sum(n for (t, p), n in outcomes.items() if p == "no cell found"),
            "unidentified": sum(n for (t, p), n in outcomes.items() if p == "unidentified"),
            "originals": len(votes), "originals_correct": sum(t == p for t, p in votes),
            "majority_vote_accuracy": float(np.mean([t == p for t, p in votes])) if votes else None}


def report(result: dict) -> None:
    print(f"images: {result['images']}, accuracy {result['accuracy']:.4f}")
    for c, r in result["per_class"].items():
        print(f"  {c:<11} n={r['n']:5d} recall {r['recall']:.3f} precision {r['precision']:.3f}")
    print(f"macro-F1 {result['macro_f1']:.4f}; not found: {result['not_found']}; unidentified: {result['unidentified']}")
    print(f"originals: {result['originals']}, majority-vote accuracy {result['majority_vote_accuracy']:.4f}")


def shown_path(path: Path) -> str:
    """A path as written into results: relative to the repository, never this machine's absolute path."""
    return os.path.relpath(Path(path).resolve(), REPO)


def model_description(model: Path) -> dict:
    """The bundle's name and how its model was trained, from bundle.json where it says."""
    try:
        bundle = json.loads((Path(model) / "bundle.json").read_text())
    except (OSError, ValueError):
        return {}
    out = {"bundle_name": bundle.get("name"), "model_sha256": bundle.get("model_sha256")}
    prov = bundle.get("provenance") or {}
    config = prov.get("train_config") or {}
    training = {k: v for k, v in (("run", prov.get("run")), ("backbone", prov.get("backbone") or config.get("backbone")),
                                  ("weights", prov.get("weights") or config.get("weights")),
                                  ("augment", config.get("augment")), ("sources", prov.get("sources")))
                if v is not None}
    test_source = prov.get("test_source") or (prov.get("test_groups") or {}).get("source")
    if test_source:
        training["test_source"] = test_source
    if bundle.get("description"):
        training["description"] = bundle["description"]
    if training:
        out["training"] = training
    return out


if __name__ == "__main__":
    sys.exit(main())
