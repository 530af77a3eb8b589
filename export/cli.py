"""`hematovision-export RUN_DIR --out BUNDLE_DIR`: argument parsing here, the work in export/bundle.py."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hematovision.commandline import new_parser, progress_bar, progress_wanted, setup_logging
from hematovision.errors import HematovisionError

from .gate import GateMargins

DESCRIPTION = """Export a finished training run as the device's int8 model bundle, behind the float-versus-int8 gate.

hematovision-export RUN --out BUNDLE       convert, measure and write the bundle (or refuse, writing nothing)
hematovision-export --restamp BUNDLE       check a bundle whose bundle.json was edited on purpose (or exported
                                           before bundles were stamped) and stamp it anew

TensorFlow's own log is hidden unless -v is given; on a terminal a progress bar shows the stage."""
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# TensorFlow's Python loggers, quiet below ERROR unless -v.
TF_LOGGERS = ("tensorflow", "absl", "keras", "h5py")


def build_parser() -> argparse.ArgumentParser:
    p = new_parser("hematovision-export", DESCRIPTION)
    p.add_argument("run", type=Path, nargs="?", help="a finished hematovision-train run folder")
    p.add_argument("--out", type=Path, help="bundle folder to write")
    p.add_argument("--restamp", type=Path, metavar="BUNDLE",
                   help="check an edited bundle and stamp its bundle.json anew (instead of exporting)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0, help="points of accuracy int8 may lose")
    p.add_argument("--max-recall-drop", type=float, default=3.0, help="points of recall int8 may lose, any class")
    p.add_argument("--min-agreement", type=float, default=0.95,
                   help="least share of test cells where int8 gives float's top-1 class")
    p.add_argument("--min-macro-f1", type=float, default=0.80,
                   help="floor: least int8 macro-F1 on the held-out cells")
    p.add_argument("--min-recall", type=float, default=0.50,
                   help="floor: least int8 recall of every class on the held-out cells")
    p.add_argument("--calibration-crops", type=int, default=300, help="crops calibrating int8; at least 200")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight quantization (for comparison)")
    p.add_argument("--threads", type=int, default=None, help="LiteRT threads; default: one per core")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.restamp is not None:
        if args.run is not None or args.out is not None:
            return _usage(parser, "--restamp BUNDLE takes no RUN and no --out")
        setup_logging(args, fmt=LOG_FORMAT)
        return _restamp(args.restamp)
    if args.run is None or args.out is None:
        return _usage(parser, "give a RUN folder and --out BUNDLE (or --restamp BUNDLE)")
    if args.calibration_crops < 200:
        return _usage(parser, "--calibration-crops must be at least 200")
    return _export(args)


def _export(args) -> int:
    margins = GateMargins(args.max_accuracy_drop, args.max_recall_drop, args.min_agreement, args.min_macro_f1,
                          args.min_recall)
    show_bar = progress_wanted(args)
    with tensorflow_log_hidden(not args.verbose) as terminal:
        setup_logging(args, fmt=LOG_FORMAT, stream=terminal)
        from .bundle import EXPORT_STEPS, ExportOptions, export_run  # imports TensorFlow: its log is hidden now

        options = ExportOptions(margins, args.calibration_crops, not args.per_tensor, threads=args.threads)
        with progress_bar(len(EXPORT_STEPS), "export", "stage", show_bar, terminal) as bar:
            try:
                export_run(args.run, args.out, options, _stepper(bar, EXPORT_STEPS))
            except HematovisionError as err:
                failure = err
            else:
                failure = None
    setup_logging(args, fmt=LOG_FORMAT)  # the stream above is closed now
    if failure is not None:
        print(f"hematovision-export: error: {failure}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


def _stepper(bar, steps: tuple[str, ...]):
    """The `step` hook of export_run: the bar shows the stage under way and counts those done."""
    def step(name: str) -> None:
        bar.set_description_str(name)
        if name != steps[0]:
            bar.update()
    return step


@contextlib.contextmanager
def tensorflow_log_hidden(hide: bool) -> Iterator:
    """While exporting, what TensorFlow's C++ code writes to file descriptor 2 (and its Python loggers'
    chatter) goes nowhere; yields a text stream on the real stderr for this program's own log and bar."""
    if not hide:
        yield sys.stderr
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in TF_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink, os.fdopen(os.dup(saved), "w", buffering=1) as terminal:
        os.dup2(sink.fileno(), 2)
        try:
            yield terminal if _on_fd2(sys.stderr) else sys.stderr  # a replaced sys.stderr is left as it is
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _on_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, ValueError, OSError):
        return False


def _usage(parser: argparse.ArgumentParser, message: str) -> int:
    parser.print_usage(sys.stderr)
    print(f"hematovision-export: error: {message}", file=sys.stderr)
    return 2


def _restamp(bundle: Path) -> int:
    from .files import restamp_bundle

    try:
        restamp_bundle(bundle)
    except HematovisionError as err:
        print(f"hematovision-export: error: {err}", file=sys.stderr)
        return 1
    print(bundle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
