"""Speed and memory of the device pipeline: segmentation per field, classification per cell, RSS.

Prints figures; not a test. Run from the repository root:
    .venv/bin/python benchmarks/bench_pipeline.py --model BUNDLE [--fields DIR] [--n 100] [--json FILE]
Targets (issue 4): segmentation <= 10 ms per 640x480 field; the whole pipeline within 1.5x of
the classifier's own time; peak RSS of `hematovision-edge count` over 100 fields <= 250 MB.
`--json FILE` also writes the printed rows (1 and 2 threads) and the peak RSS as one JSON object.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from provenance import write_result

REPO = Path(__file__).resolve().parents[1]
SHARED_FIELDS = REPO.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages"
SAMPLE_FIELDS = REPO / "samples" / "bccd" / "BCCD" / "JPEGImages"


def field_paths(folder: Path, n: int) -> list[Path]:
    paths = sorted(folder.glob("*.jpg"))
    return (paths * (n // max(len(paths), 1) + 1))[:n]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, 1000 * (time.perf_counter() - start)


def stage_times(model: Path, paths: list[Path], threads: int, repeats: int) -> dict:
    """Each stage timed over the whole field sequence `repeats` times (fresh pipelines, so the
    red-cell estimate keeps its real cadence); per field the fastest run counts, the usual
    defence against a noisy machine. The pipeline-to-classifier ratio compares the sums."""
    from hematovision.edge.vision.classify import classify_crops, cut_cells
    from hematovision.edge.vision.model_bundle import load_bundle
    from hematovision.edge.vision.pipeline import FieldPipeline
    from hematovision.pixels import read_rgb

    bundle = load_bundle(model, threads)
    images = [read_rgb(p) for p in paths]
    seg_ms, cls_ms, total_ms = (np.full((repeats, len(images)), np.inf) for _ in range(3))
    cells = np.zeros(len(images), int)
    for rep in range(repeats):
        detecting, processing = FieldPipeline(bundle), FieldPipeline(bundle)
        for i, image in enumerate(images):
            seg, seg_ms[rep, i] = timed(detecting.detect, image)
            crops = cut_cells(image, [c.center for c in seg.cells], seg.um_per_pixel, bundle)
            cells[i] = len(crops)
            cls_ms[rep, i] = timed(classify_crops, bundle, crops)[1] if len(crops) else 0.0
            total_ms[rep, i] = timed(processing.process, image)[1]
    seg_ms, cls_ms, total_ms = seg_ms.min(0), cls_ms.min(0), total_ms.min(0)
    has = cells > 0
    return {"threads": threads, "fields": len(images), "cells": int(cells.sum()),
            "segment_ms_median": float(np.median(seg_ms)), "segment_ms_p95": float(np.percentile(seg_ms, 95)),
            "classify_ms_per_cell": float(np.median(cls_ms[has] / cells[has])) if has.any() else float("nan"),
            "pipeline_ms_per_field": float(total_ms.mean()),
            "pipeline_over_classifier": float(total_ms.sum() / cls_ms.sum()) if has.any() else float("nan")}


def count_peak_rss_mb(model: Path, paths: list[Path]) -> float:
    cmd = [str(REPO / ".venv" / "bin" / "hematovision-edge"), "count", "--all", "--model", str(model), "--json",
           *map(str, paths)]  # --all: every field, past the target
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "reference")
    parser.add_argument("--fields", type=Path, default=SHARED_FIELDS if SHARED_FIELDS.is_dir() else SAMPLE_FIELDS)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="runs per field and stage; the fastest counts")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")
    args = parser.parse_args()
    paths = field_paths(args.fields, args.n)
    print(f"{len(paths)} fields from {args.fields.name}, model {args.model.name}")
    rows = []
    for threads in (1, 2):
        row = stage_times(args.model, paths, threads, args.repeats)
        rows.append(row)
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    rss = count_peak_rss_mb(args.model, paths)
    print(f"peak RSS of `hematovision-edge count` over {len(paths)} fields: {rss:.0f} MB")
    if args.json:
        result = {"model": os.path.relpath(args.model.resolve(), REPO),
                  "fields_dir": os.path.relpath(args.fields.resolve(), REPO),
                  "fields": len(paths), "repeats": args.repeats,
                  "rows": [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
                           for row in rows],
                  "peak_rss_mb": rss}
        write_result(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
