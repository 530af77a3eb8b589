"""`hematovision-edge`: classify crops and count fields; argument parsing only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hematovision.errors import DataError, HematovisionError
from hematovision.pixels import read_rgb

from .config import DEFAULT_CONFIG, default_model

logger = logging.getLogger("hematovision.edge")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


def _pixel_count(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of pixels above 0")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hematovision-edge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    cl = sub.add_parser("classify", help="classify single-cell images (the white cell at each image's centre)")
    cl.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    cl.add_argument("--um-per-pixel", type=_positive_float, default=None,
                    help="pixel size of the images; default: measured from the red cells in view, else "
                         "assumed from the cell's size (the output says which)")
    cn = sub.add_parser("count", help="find, classify and count the white cells of fields")
    cn.add_argument("inputs", nargs="+", metavar="FIELD_OR_FOLDER")
    cn.add_argument("--calibration", type=Path, help="calibration profile (hematovision-calibrate)")
    cn.add_argument("--scan", action="store_true", help="inputs are consecutive frames of one specimen")
    cn.add_argument("--target", type=int, default=100, help="cells to count (default 100)")
    cn.add_argument("--report", type=Path, metavar="DIR", help="write JSON, CSV and HTML reports here")
    cn.add_argument("--specimen-id", default="specimen", help="id used in the report")
    from .links.send import add_send_arguments

    add_send_arguments(sub.add_parser("send", help="send one report over a serial port (ASTM or JSON lines)"))

    run = sub.add_parser("run", help="the headless daemon (systemd service)")
    check = sub.add_parser("check-config", help="validate the configuration, model and profile, then exit")
    spec = sub.add_parser("specimen", help="tell the running daemon to start or finish a specimen")
    spec.add_argument("action", choices=("start", "finish"))
    spec.add_argument("--id", dest="specimen_id")
    spec.add_argument("--target", type=int)
    for p in (run, check, spec):
        p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help=f"default {DEFAULT_CONFIG}")
    for p in (cl, cn):
        p.add_argument("--model", type=Path, default=None, help="model bundle (default: the reference bundle)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.add_argument("--threads", type=int, default=None)
        p.add_argument("--max-pixels", type=_pixel_count, default=None, metavar="N",
                       help="refuse images of more pixels (default $HEMATOVISION_MAX_PIXELS, else 24 million)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except HematovisionError as err:
        print(f"hematovision-edge: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # a file the library did not expect to fail on: one line, never a traceback
        print(f"hematovision-edge: error: {err.filename or 'a file'}: {err.strerror}; check the path, its "
              "permissions and free space", file=sys.stderr)
        return 1


def _run(args) -> int:
    from .service.daemon import run_main

    return run_main(args.config)


def _check_config(args) -> int:
    from .service.daemon import check_config_main

    return check_config_main(args.config)


def _specimen(args) -> int:
    from .service.daemon import command_main

    return command_main(args.config, args.action, args.specimen_id, args.target)


def _send(args) -> int:
    from .links.send import send_main

    return send_main(args)


def _bundle(args):
    from .vision.model_bundle import load_bundle

    return load_bundle(args.model or default_model(), args.threads)


def _classify(args) -> int:
    from .vision.classify import classify_cell_image
    from .counting.count import expand_inputs

    bundle = _bundle(args)
    paths = expand_inputs(args.images)
    failed = 0
    for path in paths:
        try:
            cell, p = classify_cell_image(bundle, read_rgb(path, args.max_pixels), args.um_per_pixel, str(path))
        except HematovisionError as err:
            failed += 1
            print(f"hematovision-edge: skipped: {err}", file=sys.stderr)
            if args.json:
                print(json.dumps({"path": str(path), "error": str(err)}), flush=True)
            continue
        if args.json:
            print(json.dumps({"path": str(path), "label": p.label, "confidence": round(p.confidence, 4),
                              "probabilities": {k: round(v, 4) for k, v in p.probabilities.items()},
                              "cell": cell.to_json()}), flush=True)
        else:
            print(f"{path}\t{p.label}\t{p.confidence:.3f}\t({cell.scale_source} scale)")
    if failed:
        print(f"hematovision-edge: {len(paths) - failed} of {len(paths)} images classified, {failed} skipped",
              file=sys.stderr)
    return 1 if failed == len(paths) else 0


def _count(args) -> int:
    from .counting.count import CountRun, count_frames, expand_inputs
    from .vision.pipeline import FieldPipeline
    from .counting.select import make_selector
    from .counting.tally import Counter

    bundle = _bundle(args)
    profile = _profile(args.calibration)
    pipeline = FieldPipeline(bundle, profile)
    run = CountRun(Counter(bundle.classes, args.target))
    paths = expand_inputs(args.inputs)
    results = count_frames(pipeline, paths, run, make_selector("scan" if args.scan else "fields", None),
                           args.max_pixels)
    for path, result in results:
        if args.json:
            print(json.dumps({"path": str(path), "width": result.width, "height": result.height,
                              "cells": [c.to_json() for c in result.cells]}), flush=True)
    if len(run.skipped_files) == len(paths):
        path, reason = run.skipped_files[0]
        first = reason if reason.startswith(path) else f"{path}: {reason}"
        raise DataError(f"none of the {len(paths)} input(s) could be counted, so no differential and no report "
                        f"(first: {first}); give microscope fields as .jpg, .png, .bmp or .tif images")
    summary = run.summary()
    print(json.dumps({"summary": summary}) if args.json else format_table(summary))
    if args.report:
        _write_reports(args, bundle, profile, run)
    return 0


def _profile(path: Path | None):
    if path is None:
        return None
    from hematovision.calibration.profile import load_profile

    return load_profile(path)


def _write_reports(args, bundle, profile, run) -> None:
    from .reports.build import report_from_run
    from .reports.files import write_report_files

    report = report_from_run(run, bundle, profile, args.specimen_id)
    for path in write_report_files(report, args.report):
        print(f"wrote {path}", file=sys.stderr)


def format_table(summary: dict) -> str:
    """The differential as a readable table, NRBC and rejected cells on lines of their own below it."""
    reached = "reached" if summary["target_reached"] else "not reached"
    lines = [f"Differential: {summary['identified']} cells identified, {summary['unidentified']} unidentified "
             f"(target {summary['target']}: {reached}); {summary['fields']} fields",
             f"{'class':<13}{'count':>6}{'%':>8}   95% CI"]
    for c in summary["classes"]:
        lo, hi = c["ci95"]
        lines.append(f"{c['name']:<13}{c['count']:>6}{c['percent']:>8.1f}   {lo:5.1f} - {hi:5.1f}")
    lines.append(f"{'unidentified':<13}{summary['unidentified']:>6}")
    lines += _beside_lines(summary)
    for skipped in summary["skipped_files"]:
        lines.append(f"skipped {skipped['path']}: {skipped['reason']}")
    return "\n".join(lines)


def _beside_lines(summary: dict) -> list[str]:
    """NRBC per 100 WBC and rejected detections: counted beside the differential, not in its 100%."""
    lines = []
    if "nrbc" in summary:
        nrbc = summary["nrbc"]
        per = "n/a" if nrbc["per_100_wbc"] is None else f"{nrbc['per_100_wbc']:.1f}"
        lines.append(f"{'NRBC':<13}{nrbc['count']:>6}   {per} per 100 WBC "
                     "(nucleated red cells, not in the 100%)")
    if "rejected" in summary:
        counts = ", ".join(f"{r['name']} {r['count']}" for r in summary["rejected"])
        lines.append(f"not white cells (rejected): {counts}")
    return lines


COMMANDS = {"classify": _classify, "count": _count, "send": _send, "run": _run,
            "check-config": _check_config, "specimen": _specimen}


if __name__ == "__main__":
    sys.exit(main())
