"""Count-once benchmark: simulated pans over mosaics of BCCD fields through segment and CountOnce.

    python benchmarks/bench_scan.py                               # 3 scans of 6x5 fields, ../shared/data
    python benchmarks/bench_scan.py --runs 1 --columns 4 --rows 3 --data samples/bccd
    python benchmarks/bench_scan.py --runs 4 --json runs/results/scan.json  # also the figures as JSON

Each run tiles its own fields (run k takes fields k*n .. k*n+n-1 of the distinct annotated BCCD
fields, name order) and pans a 640x480 window along a serpentine with defocused frames, fast smeared
steps and detours (a jump away and a jump back). A counted cell is matched to the annotated
WBC box holding its centre on the slide. No classifier is involved.

`--json FILE` also writes the totals over all runs as one JSON object, the keys
benchmarks/results_table.py reads (frames, whole_cells: truth WBCs fully in view in a sharp frame,
counted_once: those counted, double_counts, jumps, relocalised), then the settings, the full score
and tracker counters, timings, and the same figures for each run under "per_run".
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from hematovision.edge.counting import scansim
from hematovision.edge.counting.register import prepare, register
from hematovision.edge.counting.track import CountOnce, TrackCounters, frame_focus
from hematovision.edge.vision.segment import segment

from provenance import write_result

logger = logging.getLogger("bench_scan")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data" / "bccd"


def run_scan(fields, settings: scansim.ScanSettings) -> dict:
    """One simulated scan: its score, the tracker's counters, timings and map-0 drift."""
    slide = scansim.build_slide(fields, settings)
    tracker, um = CountOnce(), settings.um_per_pixel
    frames, counted, reg_ms, feed_ms, drift, previous = [], [], [], [], [], None
    for frame in scansim.scan(slide, settings):
        segmentation = segment(frame.image, um_per_pixel=um)
        t0 = time.perf_counter()
        work = prepare(frame.image, um)
        if previous is not None:
            register(previous, work)
        t1 = time.perf_counter()
        result = tracker.feed(frame.image, segmentation, frame_focus(frame.image, um))
        t2 = time.perf_counter()
        reg_ms.append((t1 - t0) * 1e3)
        feed_ms.append((t2 - t1) * 1e3)
        previous = work
        counted += [(frame.origin, new.detection.center) for new in result.new_cells]
        if result.map == 0:
            drift.append(float(np.hypot(*(np.array(result.position_um) - np.array(frame.origin) * um))))
        frames.append(replace(frame, image=None))
    return {"score": scansim.score(slide, frames, counted), "counters": tracker.counters, "frames": len(frames),
            "reg_ms": statistics.median(reg_ms), "feed_ms": statistics.median(feed_ms),
            "feed_ms_max": max(feed_ms), "drift_um": max(drift)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding BCCD/{JPEGImages,Annotations}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--columns", type=int, default=6)
    parser.add_argument("--rows", type=int, default=5)
    parser.add_argument("--detours", type=int, default=4)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures to FILE as one JSON object")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    n = args.columns * args.rows
    fields = scansim.field_paths(args.data, n * args.runs)  # distinct: no place is shown twice
    results = []
    for k in range(args.runs):
        settings = scansim.ScanSettings(columns=args.columns, rows=args.rows, detours=args.detours, seed=k)
        results.append(run_scan(fields[k * n:(k + 1) * n], settings))
        report(f"run {k}", results[-1])
    report("total", total(results))
    if args.json:
        write_result(args.json, json_result(results, args))
    return 0


def figures(r: dict) -> dict:
    """One run's (or the total's) figures as JSON: first the keys results_table.py reads."""
    s, c = r["score"], r["counters"]
    return {"frames": r["frames"], "whole_cells": s.in_view, "counted_once": s.matched, "double_counts": s.doubles,
            "jumps": c.jumps, "relocalised": c.relocalised, "score": asdict(s), "counters": asdict(c),
            "reg_ms_median": r["reg_ms"], "feed_ms_median": r["feed_ms"], "feed_ms_max": r["feed_ms_max"],
            "drift_um_max": r["drift_um"]}


def json_result(results: list[dict], args) -> dict:
    """The totals over all runs, the settings (paths relative to the repository) and each run's figures."""
    data = os.path.relpath(args.data.resolve(), REPO)
    settings = {"runs": args.runs, "columns": args.columns, "rows": args.rows, "detours": args.detours, "data": data}
    command = ".venv/bin/python benchmarks/bench_scan.py " + " ".join(f"--{k} {v}" for k, v in settings.items())
    return {**figures(total(results)), "settings": settings, "command": command,
            "per_run": [{"run": k, "seed": k, **figures(r)} for k, r in enumerate(results)]}


def total(results: list[dict]) -> dict:
    add = lambda cls, key: cls(**{f: sum(getattr(r[key], f) for r in results) for f in asdict(results[0][key])})
    return {"score": add(scansim.ScanScore, "score"), "counters": add(TrackCounters, "counters"),
            "frames": sum(r["frames"] for r in results), "reg_ms": statistics.median(r["reg_ms"] for r in results),
            "feed_ms": statistics.median(r["feed_ms"] for r in results),
            "feed_ms_max": max(r["feed_ms_max"] for r in results), "drift_um": max(r["drift_um"] for r in results)}


def report(name: str, r: dict) -> None:
    s, c = r["score"], r["counters"]
    recall = s.matched / s.in_view if s.in_view else float("nan")
    print(f"{name}: {r['frames']} frames; truth WBCs fully in view in a sharp frame {s.in_view}; "
          f"counted {s.counted}: matched {s.matched} ({recall:.1%}), double counts {s.doubles}, missed {s.missed}, "
          f"on seam-cut cells {s.cut} (counted twice: {s.cut_doubles}), false positives {s.false_positives}")
    print(f"  skipped frames: blur {c.skipped_blur}, motion {c.skipped_motion}; jumps {c.jumps}: relocalised "
          f"{c.relocalised}, new maps {c.new_maps}; held back by appearance {c.recognised}; "
          f"map-0 drift {r['drift_um']:.2f} um")
    print(f"  ms per frame: registration {r['reg_ms']:.2f} (median), tracker feed {r['feed_ms']:.2f} "
          f"(median, max {r['feed_ms_max']:.0f})")


if __name__ == "__main__":
    sys.exit(main())
