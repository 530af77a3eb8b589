"""`hematovision-export RUN_DIR --out BUNDLE_DIR`: int8 bundle behind the float-versus-int8 gate.

`hematovision-export --restamp BUNDLE_DIR` checks a bundle whose bundle.json was edited on purpose
(or exported before bundles were stamped) and stamps it anew."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hematovision.errors import HematovisionError

from .gate import GateMargins


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hematovision-export", description=__doc__)
    p.add_argument("run", type=Path, nargs="?", help="a finished hematovision-train run folder")
    p.add_argument("--out", type=Path, help="bundle folder to write")
    p.add_argument("--restamp", type=Path, metavar="BUNDLE",
                   help="check an edited bundle and stamp its bundle.json anew (instead of exporting)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="points (default 1)")
    p.add_argument("--max-recall-drop", type=float, default=3.0, help="points, any class (default 3)")
    p.add_argument("--min-agreement", type=float, default=0.95,
                   help="least share of test cells where int8 gives float's top-1 class (default 0.95)")
    p.add_argument("--min-macro-f1", type=float, default=0.80,
                   help="floor: least int8 macro-F1 on the held-out cells (default 0.80)")
    p.add_argument("--min-recall", type=float, default=0.50,
                   help="floor: least int8 recall of every class on the held-out cells (default 0.50)")
    p.add_argument("--calibration-crops", type=int, default=300, help="at least 200")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight quantization (for comparison)")
    p.add_argument("--threads", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.restamp is not None:
        return _restamp(args.restamp) if args.run is None and args.out is None else \
            _usage(parser, "--restamp BUNDLE takes no RUN and no --out")
    if args.run is None or args.out is None:
        return _usage(parser, "give a RUN folder and --out BUNDLE (or --restamp BUNDLE)")
    if args.calibration_crops < 200:
        return _usage(parser, "--calibration-crops must be at least 200")
    from .bundle import ExportOptions, export_run

    options = ExportOptions(GateMargins(args.max_accuracy_drop, args.max_recall_drop, args.min_agreement,
                                        args.min_macro_f1, args.min_recall),
                            args.calibration_crops, not args.per_tensor, threads=args.threads)
    try:
        export_run(args.run, args.out, options)
    except HematovisionError as err:
        print(f"hematovision-export: error: {err}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


def _usage(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"hematovision-export: error: {message}", file=sys.stderr)
    return 2


def _restamp(bundle: Path) -> int:
    from .bundle import restamp_bundle

    try:
        restamp_bundle(bundle)
    except HematovisionError as err:
        print(f"hematovision-export: error: {err}", file=sys.stderr)
        return 1
    print(bundle)
    return 0
