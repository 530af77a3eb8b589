"""The whole device pipeline on the Kaggle TEST fields: segment, take the labelled cell, classify.

Prints figures; not a test. Run from the repository root:
    .venv/bin/python benchmarks/bench_kaggle_pipeline.py --model BUNDLE [--split TEST] [--limit N]
Each Kaggle image is a field (320x240, half the BCCD resolution) with one labelled white cell
near its centre. The cell found nearest the centre is classified; an image where no cell is found
counts as an error. TEST holds augmentations of only about 71 originals, so the figures are also
given per original (majority vote), the honest sample size.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
KAGGLE = REPO.parent / "shared" / "data" / "kaggle_blood_cells" / "images"


def nearest_to_centre(seg, width: int, height: int):
    cells = seg.cells or seg.edge_cells
    if not cells:
        return None
    centre = np.array([width / 2, height / 2])
    return min(cells, key=lambda c: float(np.linalg.norm(np.array(c.center) - centre)))


def classify_field(pipeline, image):
    from hematovision.edge.classify import classify_crops, cut_cells

    seg = pipeline.detect(pipeline.prepare(image))
    cell = nearest_to_centre(seg, image.shape[1], image.shape[0])
    if cell is None:
        return "no cell found"
    crops = cut_cells(image, [cell.center], seg.um_per_pixel, pipeline.bundle)
    return classify_crops(pipeline.bundle, crops)[0].label


def main() -> int:
    from hematovision.classes import parse_label
    from hematovision.edge.model_bundle import load_bundle
    from hematovision.edge.pipeline import FieldPipeline
    from hematovision.pixels import read_rgb

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference")
    parser.add_argument("--split", default="TEST")
    parser.add_argument("--limit", type=int, default=0, help="images per class (0: all)")
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
    report(outcomes, by_original, pipeline.bundle.classes)
    return 0


def report(outcomes: Counter, by_original: dict, classes) -> None:
    total = sum(outcomes.values())
    correct = sum(n for (t, p), n in outcomes.items() if t == p)
    print(f"images: {total}, accuracy {correct / total:.4f}")
    f1 = []
    for c in classes:
        tp = outcomes[(c, c)]
        fn = sum(n for (t, p), n in outcomes.items() if t == c and p != c)
        fp = sum(n for (t, p), n in outcomes.items() if p == c and t != c)
        if tp + fn:
            f1.append(2 * tp / max(2 * tp + fp + fn, 1))
            print(f"  {c:<11} n={tp + fn:5d} recall {tp / (tp + fn):.3f} precision {tp / max(tp + fp, 1):.3f}")
    print(f"macro-F1 {np.mean(f1):.4f}; not found: {sum(n for (t, p), n in outcomes.items() if p == 'no cell found')}; "
          f"unidentified: {sum(n for (t, p), n in outcomes.items() if p == 'unidentified')}")
    votes = [(t, v.most_common(1)[0][0]) for (t, _), v in by_original.items()]
    print(f"originals: {len(votes)}, majority-vote accuracy {np.mean([t == p for t, p in votes]):.4f}")


if __name__ == "__main__":
    sys.exit(main())
