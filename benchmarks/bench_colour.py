"""Colour-calibration benchmark: does the Reinhard Lab transfer bring other labs' fields toward BCCD's?

    python benchmarks/bench_colour.py                    # statistics and detection, all four labs
    python benchmarks/bench_colour.py --fields 40        # faster: 40 held-out fields per lab
    python benchmarks/bench_colour.py --model BUNDLE     # adds classification confidence with/without

Target: the stain statistics of the BCCD fields (../shared/data/bccd), or the model bundle's
`stain_stats` when --model gives a bundle that has them. Each TXL-PBC lab (told by image size)
is calibrated as a microscope would be: its source statistics come from its train-split fields,
and every figure is measured on its val-split fields, before and after the transform.

Figures per lab, before -> after:
- stats: distance of each field's Lab mean and std to the target's (Lab units, mean over fields);
- dE WBC / RBC / bg: Lab distance of the mean colour inside the annotated WBC boxes, RBC boxes and
  outside all boxes to the same regions of TXL-PBC's BCCD fields (what a detector tuned on BCCD sees);
- detection: white-cell recall and precision of edge/vision/segment.py (centre inside an annotated box,
  one-to-one), pixel size estimated from the red cells as no lab's pixel size is known.
Classification accuracy cannot be measured here (TXL-PBC has no white-cell types); with --model
the mean confidence, the fraction below the bundle's threshold and the fraction of changed
predictions are printed instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from hematovision.calibration.colour import StainStats, reinhard_transfer, rgb_to_lab, stain_stats, stats_distance
from hematovision.errors import HematovisionError
from hematovision.pixels import list_images, read_rgb

logger = logging.getLogger("bench_colour")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LABS = {(480, 640): "BCCD", (416, 416): "BCDD", (363, 360): "PBC", (369, 366): "PBC", (575, 575): "Raabin"}
REGIONS = ("WBC", "RBC", "bg")


def txl_fields(root: Path, split: str) -> dict[str, list[tuple[Path, Path]]]:
    """(image, YOLO label) pairs of a TXL-PBC split, grouped by lab."""
    labs = defaultdict(list)
    for image in list_images(root / "images" / split):
        shape = read_rgb(image).shape[:2]
        labs[LABS.get(shape, f"{shape[1]}x{shape[0]}")].append((image, root / "labels" / split / f"{image.stem}.txt"))
    return labs


def yolo_boxes(label: Path, height: int, width: int) -> dict[int, list[tuple[int, int, int, int]]]:
    """Boxes in pixels (x0, y0, x1, y1) per class number (0 WBC, 1 RBC, 2 platelets)."""
    boxes = defaultdict(list)
    for line in label.read_text().splitlines() if label.is_file() else []:
        parts = line.split()
        if len(parts) == 5:
            cx, cy, bw, bh = (float(v) for v in parts[1:])
            box = (int((cx - bw / 2) * width), int((cy - bh / 2) * height),
                   int(np.ceil((cx + bw / 2) * width)), int(np.ceil((cy + bh / 2) * height)))
            boxes[int(parts[0])].append(box)
    return boxes


def region_means(image: np.ndarray, boxes: dict) -> dict[str, np.ndarray]:
    """Mean Lab colour inside the WBC boxes, the RBC boxes, and outside every box."""
    lab = rgb_to_lab(image)
    masks = {name: np.zeros(image.shape[:2], bool) for name in REGIONS}
    for cls, name in ((0, "WBC"), (1, "RBC")):
        for x0, y0, x1, y1 in boxes.get(cls, []):
            masks[name][max(y0, 0):y1, max(x0, 0):x1] = True
    masks["bg"] = ~(masks["WBC"] | masks["RBC"])
    for x0, y0, x1, y1 in boxes.get(2, []):
        masks["bg"][max(y0, 0):y1, max(x0, 0):x1] = False
    return {name: lab[m].mean(0) for name, m in masks.items() if m.any()}


def detection_counts(image: np.ndarray, wbc_boxes: list) -> tuple[int, int, int]:
    """(annotated, detected, matched) white cells of edge/vision/segment.py on one field."""
    from hematovision.edge.vision.segment import segment  # noqa: PLC0415 - optional stage, may be absent

    try:
        cells = segment(image).all_cells
    except HematovisionError:
        return len(wbc_boxes), 0, 0
    free, matched = list(wbc_boxes), 0
    for x, y in (c.center for c in cells):
        hit = next((b for b in free if b[0] <= x < b[2] and b[1] <= y < b[3]), None)
        if hit is not None:
            free.remove(hit)
            matched += 1
    return len(wbc_boxes), len(cells), matched


def classify(bundle, image: np.ndarray, wbc_boxes: list) -> np.ndarray:
    """Class probabilities of the annotated white cells (pixel size estimated from red cells)."""
    from hematovision.crop import cut_crop  # noqa: PLC0415
    from hematovision.edge.vision.segment import estimate_um_per_pixel  # noqa: PLC0415
    from hematovision.pixels import model_input  # noqa: PLC0415

    if not wbc_boxes:
        return np.zeros((0, len(bundle.classes)))
    um = estimate_um_per_pixel(image)
    crops = np.stack([cut_crop(image, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), um, bundle.geometry) for b in wbc_boxes])
    logits = bundle.model.logits(model_input(crops)) / bundle.temperature
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def measure_lab(fields, source: StainStats, target: StainStats, reference: dict, bundle, detect: bool) -> dict:
    """All before/after figures for one lab's held-out fields."""
    out = defaultdict(list)
    for image_path, label in fields:
        before = read_rgb(image_path)
        after = reinhard_transfer(before, source, target)
        boxes = yolo_boxes(label, *before.shape[:2])
        for tag, image in (("before", before), ("after", after)):
            out[f"stats_{tag}"].append(stats_distance(stain_stats([image]), target))
            for name, mean in region_means(image, boxes).items():
                if name in reference:
                    out[f"{name}_{tag}"].append(float(np.linalg.norm(mean - reference[name])))
            if detect:
                out[f"det_{tag}"].append(detection_counts(image, boxes.get(0, [])))
            if bundle is not None:
                out[f"prob_{tag}"].append(classify(bundle, image, boxes.get(0, [])))
    return out


def reference_regions(fields) -> dict[str, np.ndarray]:
    """Mean Lab colour of each region over the reference lab's fields."""
    sums = defaultdict(list)
    for image_path, label in fields:
        image = read_rgb(image_path)
        for name, mean in region_means(image, yolo_boxes(label, *image.shape[:2])).items():
            sums[name].append(mean)
    return {name: np.mean(v, axis=0) for name, v in sums.items()}


def _detection_text(rows) -> str:
    truth, detected, matched = np.sum(rows, axis=0)
    return f"recall {matched / max(truth, 1):.1%} precision {matched / max(detected, 1):.1%}"


def report(lab: str, figures: dict, bundle) -> None:
    line = [f"{lab:7s}", f"n={len(figures['stats_before']):3d}"]
    for key in ("stats", *REGIONS):
        if figures.get(f"{key}_before"):
            line.append(f"{key} {np.mean(figures[f'{key}_before']):5.1f} -> {np.mean(figures[f'{key}_after']):5.1f}")
    print("  ".join(line))
    if figures.get("det_before"):
        print(f"{'':7s}  detection: {_detection_text(figures['det_before'])} -> {_detection_text(figures['det_after'])}")
    if bundle is not None and figures.get("prob_before"):
        pb, pa = np.concatenate(figures["prob_before"]), np.concatenate(figures["prob_after"])
        print(f"{'':7s}  classification: mean confidence {pb.max(1).mean():.2f} -> {pa.max(1).mean():.2f}, "
              f"below threshold {np.mean(pb.max(1) < bundle.threshold):.1%} -> {np.mean(pa.max(1) < bundle.threshold):.1%}, "
              f"changed predictions {np.mean(pb.argmax(1) != pa.argmax(1)):.1%}")


def load_target(bccd: Path, bundle) -> StainStats:
    if bundle is not None and "stain_stats" in bundle.meta:
        logger.info("target: the model bundle's stain statistics")
        return StainStats.from_dict(bundle.meta["stain_stats"], where=f"{bundle.path} stain_stats")
    return stain_stats(read_rgb(p) for p in list_images(bccd / "BCCD" / "JPEGImages"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    parser.add_argument("--fields", type=int, default=0, help="held-out fields per lab (0: all val fields)")
    parser.add_argument("--model", type=Path, help="model bundle: also compare classification confidence")
    parser.add_argument("--no-detection", action="store_true", help="skip the edge/vision/segment.py detection part")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    if not (args.data / "txl_pbc").is_dir():
        print(f"no TXL-PBC data under {args.data}; pass --data", file=sys.stderr)
        return 1
    bundle = None
    if args.model is None:
        print("classification with/without the transform: skipped (no --model BUNDLE given; "
              "TXL-PBC has no white-cell types, so only confidence can be compared)")
    else:
        from hematovision.edge.vision.model_bundle import load_bundle  # noqa: PLC0415

        bundle = load_bundle(args.model)
    target = load_target(args.data / "bccd", bundle)
    train, val = txl_fields(args.data / "txl_pbc", "train"), txl_fields(args.data / "txl_pbc", "val")
    reference = reference_regions(train["BCCD"])
    print(f"target Lab mean {np.round(target.lab_mean, 1).tolist()} std {np.round(target.lab_std, 1).tolist()}")
    print("per lab, mean over held-out (val) fields, before -> after the Reinhard transfer (Lab units):")
    for lab in sorted(val):
        source = stain_stats(read_rgb(p) for p, _ in train[lab])
        held_out = val[lab][: args.fields or None]
        report(lab, measure_lab(held_out, source, target, reference, bundle, not args.no_detection), bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
