"""Detection benchmark of edge/vision/segment.py: white-cell recall and precision per lab, and speed.

    python benchmarks/bench_detection.py                     # TXL-PBC val + BCCD, ms per field
    python benchmarks/bench_detection.py --split train       # the split the parameters were tuned on
    python benchmarks/bench_detection.py --set cell_margin_um=2.0
    python benchmarks/bench_detection.py --pixel-size lab     # one pixel size per lab
    python benchmarks/bench_detection.py --json runs/results/detection.json   # also the figures as JSON
    python benchmarks/bench_detection.py --limit 20           # a quick check: the first 20 fields of each set

Every detection (whole and edge-cut cells) is matched one-to-one to the annotated WBC boxes,
greedily by IoU; a match needs IoU >= 0.5. A second figure matches a detection to a box when
its centre lies inside the box. The lab of a TXL-PBC field is told by its image size. The pixel
size is estimated from each field's red cells, as no lab's pixel size is known; with
`--pixel-size lab` each lab gets the median of its fields' estimates instead, as the pipeline's
running median of estimates gives once a scan is under way.

Unmatched annotated boxes are then sorted by kind (`miss_kind`): annotation artefacts
(duplicate boxes, slivers of cells cut by the frame, boxes too small for a white cell, judged
against the lab's median box side, so without the estimated pixel size) and segmenter misses
(a box with IoU < 0.5 around a found cell, or no cell found), with the recall that leaves the
artefacts out printed beside the plain one. The plain recall is the headline figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import math
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

import numpy as np

from hematovision.edge.vision.segment import DEFAULT_PARAMS, SegmentParams, estimate_um_per_pixel, segment
from hematovision.errors import CalibrationError
from hematovision.pixels import read_rgb

from provenance import write_result

logger = logging.getLogger("bench_detection")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
LABS = {(480, 640): "BCCD", (416, 416): "BCDD", (363, 360): "PBC", (369, 366): "PBC", (575, 575): "Raabin"}


def txl_fields(root: Path, split: str):
    """(image path, YOLO label path) for each TXL-PBC field of a split."""
    for image_path in sorted((root / "images" / split).iterdir()):
        label = root / "labels" / split / (image_path.stem + ".txt")
        yield image_path, label


def txl_boxes(label: Path, height: int, width: int) -> list[tuple[float, float, float, float]]:
    """The class-0 (WBC) YOLO boxes of a label file, in pixels."""
    boxes = []
    for line in label.read_text().split("\n") if label.is_file() else []:
        parts = line.split()
        if len(parts) == 5 and parts[0] == "0":
            cx, cy, bw, bh = (float(v) for v in parts[1:])
            boxes.append(((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width, (cy + bh / 2) * height))
    return boxes


def voc_boxes(xml_path: Path, name: str = "WBC") -> list[tuple[float, float, float, float]]:
    """Valid boxes of one object name in a Pascal VOC annotation."""
    boxes = []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        if obj.findtext("name", "").strip() != name:
            continue
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        if x1 - x0 > 2 and y1 - y0 > 2:
            boxes.append((x0, y0, x1, y1))
    return boxes


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_iou(detected, truth, threshold: float = 0.5) -> int:
    """Number of one-to-one matches, greedily by decreasing IoU."""
    return len(matched_truth(detected, truth, threshold))


def match_centre(centres, truth) -> int:
    """Number of one-to-one matches of detection centres inside annotated boxes."""
    used = set()
    for x, y in centres:
        for j, (x0, y0, x1, y1) in enumerate(truth):
            if j not in used and x0 <= x <= x1 and y0 <= y <= y1:
                used.add(j)
                break
    return len(used)


def matched_truth(detected, truth, threshold: float = 0.5) -> set[int]:
    """Indices of the annotated boxes matched one-to-one, greedily by decreasing IoU."""
    pairs = sorted(((iou(d, t), i, j) for i, d in enumerate(detected) for j, t in enumerate(truth)), reverse=True)
    used_d, used_t = set(), set()
    for value, i, j in pairs:
        if value < threshold:
            break
        if i not in used_d and j not in used_t:
            used_d.add(i)
            used_t.add(j)
    return used_t


def lab_pixel_sizes(fields, params: SegmentParams) -> dict[str, float]:
    """Median red-cell pixel-size estimate of each lab (as the pipeline's running median gives)."""
    estimates = defaultdict(list)
    for lab, image, _ in fields:
        try:
            estimates[lab].append(estimate_um_per_pixel(image, params))
        except CalibrationError:
            pass
    return {lab: statistics.median(v) for lab, v in estimates.items()}


def evaluate(fields, params: SegmentParams, pixel_sizes: dict[str, float] | None = None) -> dict:
    """Counts per lab: truth, detections, IoU matches, centre matches, calibration failures,
    and the unmatched annotated boxes by kind (see `miss_kind`). With `pixel_sizes` each lab's
    pixel size is given; without, every field's is estimated from its own red cells."""
    counts = defaultdict(lambda: defaultdict(int))
    records = []
    for lab, image, truth in fields:
        c = counts[lab]
        c["fields"] += 1
        c["truth"] += len(truth)
        try:
            cells = segment(image, params, (pixel_sizes or {}).get(lab)).all_cells
        except CalibrationError:
            c["no_pixel_size"] += 1
            cells = ()
        boxes = [d.bbox for d in cells]
        matched = matched_truth(boxes, truth)
        c["detected"] += len(cells)
        c["iou"] += len(matched)
        c["centre"] += match_centre([d.center for d in cells], truth)
        records.append((lab, image.shape[:2], truth, cells, matched))
    _count_misses(counts, records)
    return counts


def _count_misses(counts: dict, records: list) -> None:
    """Add 'miss:<kind>' counts: each annotated box left unmatched, classified by `miss_kind`."""
    sizes = defaultdict(list)
    for lab, _, truth, _, _ in records:
        sizes[lab] += [math.sqrt((t[2] - t[0]) * (t[3] - t[1])) for t in truth]
    typical = {lab: statistics.median(v) for lab, v in sizes.items() if v}
    for lab, shape, truth, cells, matched in records:
        for j, box in enumerate(truth):
            if j not in matched:
                counts[lab]["miss:" + miss_kind(j, truth, matched, cells, shape, typical[lab])] += 1


ARTEFACTS = ("duplicate", "sliver", "too small")


def miss_kind(j: int, truth, matched: set[int], cells, shape, typical_side: float) -> str:
    """Why annotated box `j` was not matched. Annotation artefacts: 'duplicate' (IoU > 0.5 with
    another annotated box that was matched or comes first: one cell boxed twice, as two whole
    cells hardly overlap so much), 'sliver' (cut by the frame, its short side under a third of
    the lab's median box side), 'too small' (inside the frame, its side under 0.4 of the median).
    Segmenter misses: 'box' (a detection's centre lies inside, but no one-to-one IoU >= 0.5
    match) or 'not found'."""
    h, w = shape
    box = truth[j]
    if any(k != j and (k in matched or k < j) and iou(box, other) > 0.5 for k, other in enumerate(truth)):
        return "duplicate"
    bw, bh = box[2] - box[0], box[3] - box[1]
    cut = box[0] <= 2 or box[1] <= 2 or box[2] >= w - 2 or box[3] >= h - 2
    if cut and min(bw, bh) < typical_side / 3:
        return "sliver"
    if not cut and math.sqrt(bw * bh) < 0.4 * typical_side:
        return "too small"
    if any(box[0] <= d.center[0] <= box[2] and box[1] <= d.center[1] <= box[3] for d in cells):
        return "box"
    return "not found"


def load_txl(root: Path, split: str):
    for image_path, label in txl_fields(root, split):
        image = read_rgb(image_path)
        lab = LABS.get(image.shape[:2], f"{image.shape[1]}x{image.shape[0]}")
        yield lab, image, txl_boxes(label, *image.shape[:2])


def load_bccd(root: Path):
    for xml_path in sorted((root / "Annotations").glob("*.xml")):
        image_path = root / "JPEGImages" / (xml_path.stem + ".jpg")
        if image_path.is_file():
            yield "BCCD (VOC)", read_rgb(image_path), voc_boxes(xml_path)


def report(title: str, counts: dict) -> None:
    print(f"\n{title}")
    print(f"{'lab':12s} {'fields':>6s} {'WBC':>5s} {'det':>5s} {'recall':>7s} {'prec':>7s} "
          f"{'rec(c)':>7s} {'prec(c)':>7s} {'no px':>5s}")
    for lab in sorted(counts):
        c = counts[lab]
        rec = c["iou"] / max(1, c["truth"])
        prec = c["iou"] / max(1, c["detected"])
        rec_c = c["centre"] / max(1, c["truth"])
        prec_c = c["centre"] / max(1, c["detected"])
        print(f"{lab:12s} {c['fields']:6d} {c['truth']:5d} {c['detected']:5d} {rec:7.3f} {prec:7.3f} "
              f"{rec_c:7.3f} {prec_c:7.3f} {c['no_pixel_size']:5d}")
    report_misses(counts)


def figures(counts: dict) -> dict:
    """The printed figures of each lab as a JSON-ready dict (what `report` prints)."""
    out = {}
    for lab in sorted(counts):
        c = counts[lab]
        artefacts = sum(c["miss:" + k] for k in ARTEFACTS)
        out[lab] = {"fields": c["fields"], "wbc": c["truth"], "detections": c["detected"],
                    "recall": c["iou"] / max(1, c["truth"]), "precision": c["iou"] / max(1, c["detected"]),
                    "centre_recall": c["centre"] / max(1, c["truth"]),
                    "centre_precision": c["centre"] / max(1, c["detected"]),
                    "no_pixel_size": c["no_pixel_size"],
                    "misses": {k: c["miss:" + k] for k in ARTEFACTS + ("box", "not found")},
                    "recall_without_artefacts": c["iou"] / max(1, c["truth"] - artefacts)}
    return out


def report_misses(counts: dict) -> None:
    """Unmatched annotated boxes by kind, and the recall with annotation artefacts set aside."""
    kinds = ARTEFACTS + ("box", "not found")
    print(f"misses by kind (annotation artefacts: {', '.join(ARTEFACTS)}):")
    print(f"{'lab':12s} " + " ".join(f"{k:>10s}" for k in kinds) + f" {'recall w/o artefacts':>21s}")
    for lab in sorted(counts):
        c = counts[lab]
        artefacts = sum(c["miss:" + k] for k in ARTEFACTS)
        rec = c["iou"] / max(1, c["truth"] - artefacts)
        print(f"{lab:12s} " + " ".join(f"{c['miss:' + k]:10d}" for k in kinds) + f" {rec:21.3f}")


def time_fields(images, params: SegmentParams, repeats: int = 3) -> tuple[float, float]:
    """Median and 95th-percentile milliseconds of segment() per field (pixel size estimated)."""
    for image in images[:3]:
        _safe_segment(image, params)
    times = []
    for _ in range(repeats):
        for image in images:
            start = time.perf_counter()
            _safe_segment(image, params)
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), float(np.percentile(times, 95))


def _safe_segment(image, params):
    try:
        return segment(image, params)
    except CalibrationError:
        return None


def parse_params(settings: list[str]) -> SegmentParams:
    """DEFAULT_PARAMS with `key=value` overrides."""
    changes = {}
    fields = {f.name: f.type for f in dataclasses.fields(SegmentParams)}
    for item in settings:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown SegmentParams field {key!r}; known: {', '.join(fields)}")
        changes[key] = int(value) if fields[key] in (int, "int") else float(value)
    return dataclasses.replace(DEFAULT_PARAMS, **changes)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--split", default="val", help="TXL-PBC split: val (report) or train (tuning)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a SegmentParams field")
    parser.add_argument("--no-bccd", action="store_true", help="skip the BCCD VOC check")
    parser.add_argument("--pixel-size", choices=("field", "lab"), default="field",
                        help="estimate it per field (default), or give each lab its median estimate")
    parser.add_argument("--limit", type=int, default=0, help="only the first N fields of each set (0: all); a quick check")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    params = parse_params(args.set)
    txl = args.data / "txl_pbc"
    if not txl.is_dir():
        raise SystemExit(f"{txl} not found: run from the repository root with ../shared/data present, or pass --data")
    by_lab = args.pixel_size == "lab"

    def limited(fields):
        return itertools.islice(fields, args.limit or None)

    result = {"split": args.split, "pixel_size": args.pixel_size, "limit": args.limit,
              "params": dict(item.partition("=")[::2] for item in args.set), "iou_threshold": 0.5}
    sizes = lab_pixel_sizes(limited(load_txl(txl, args.split)), params) if by_lab else None
    counts = evaluate(limited(load_txl(txl, args.split)), params, sizes)
    report(f"TXL-PBC {args.split} split, IoU >= 0.5 (and centre-in-box), edge-cut cells included, "
           f"pixel size {'per lab ' + str({k: round(v, 4) for k, v in sizes.items()}) if by_lab else 'per field'}",
           counts)
    result["txl_pbc"] = figures(counts)
    bccd = args.data / "bccd" / "BCCD"
    if not args.no_bccd and bccd.is_dir():
        sizes = lab_pixel_sizes(limited(load_bccd(bccd)), params) if by_lab else None
        counts = evaluate(limited(load_bccd(bccd)), params, sizes)
        report("BCCD fields (VOC 'WBC' boxes), IoU >= 0.5 (and centre-in-box)", counts)
        result["bccd_voc"] = figures(counts)
    if bccd.is_dir():
        images = [read_rgb(p) for p in sorted((bccd / "JPEGImages").glob("*.jpg"))[:min(60, args.limit or 60)]]
        median, p95 = time_fields(images, params)
        print(f"\nspeed: {median:.2f} ms median, {p95:.2f} ms 95th percentile per 640x480 BCCD field "
              f"(pixel size estimated; {len(images)} fields x 3)")
        result["speed"] = {"median_ms": median, "p95_ms": p95, "fields": len(images), "repeats": 3}
    if args.json:
        write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
