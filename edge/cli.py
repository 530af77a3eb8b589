"""`hematovision-edge`: the device's commands; argument parsing here, the work in the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from hematovision.commandline import add_command, new_parser, progress_bar, progress_wanted, setup_logging
from hematovision.errors import DataError, HematovisionError
from hematovision.pixels import read_rgb

from .config import DEFAULT_CONFIG, default_model

logger = logging.getLogger("hematovision.edge")

DESCRIPTION = """Count white blood cells in microscope fields and run the counter as a service.

Cells the model is unsure of are counted as unidentified; every report is preliminary until a
person has verified it. Without --model the reference bundle installed with the package is used."""
# A white count above this (in 10^9/L) is a count per microlitre typed by mistake (7500/uL is 7.5).
MAX_WBC = 1000.0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number above 0")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number above 0")
    return int(text)


def _pixel_count(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of pixels above 0")
    return int(text)


def white_count(text: str) -> float:
    """The operator's white-cell count in 10^9/L, from the analyser or a chamber count."""
    value = _positive_float(text)
    if value > MAX_WBC:
        raise argparse.ArgumentTypeError(f"{text!r} is not a white count in 10^9/L; give it in 10^9/L "
                                         f"(a count of 7500 per microlitre is 7.5)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("hematovision-edge", DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cl = add_command(sub, "classify", "classify single-cell images (the white cell at each image's centre)")
    cl.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER")
    cl.add_argument("--um-per-pixel", type=_positive_float, default=None,
                    help="pixel size of the images; default: measured from the red cells in view, else "
                         "assumed from the cell's size (the output says which)")
    _count_arguments(add_command(sub, "count", "find, classify and count the white cells of fields"))
    from .links.send import add_send_arguments

    add_send_arguments(add_command(sub, "send", "send one report over a serial port (ASTM or JSON lines)"))
    run = add_command(sub, "run", "the headless daemon (systemd service)")
    check = add_command(sub, "check-config", "validate the configuration, model and profile, then exit")
    spec = add_command(sub, "specimen", "tell the running daemon to start or finish a specimen, or show its status "
                       "(through its web page when web.enabled, else its state folder)")
    spec.add_argument("action", choices=("start", "finish", "status"))
    spec.add_argument("--id", dest="specimen_id", help="specimen id; default: one from host name, date and time")
    spec.add_argument("--accession", help="the laboratory's accession number, shown in the report")
    spec.add_argument("--operator", help="who counts it, shown in the report")
    spec.add_argument("--json", action="store_true", help="print the answer as one JSON object")
    spec.add_argument("--target", type=_positive_int, help="cells to count; default: specimen.target of the "
                      "configuration")
    spec.add_argument("--wbc", type=white_count, metavar="X10E9_PER_L",
                      help="the specimen's white-cell count in 10^9/L: the report adds absolute counts per class")
    for p in (run, check, spec):
        p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help="the configuration file")
    _web_arguments(add_command(sub, "web", "the web page over a folder of reports (review and sign-off on a "
                                           "desktop); the device's page runs with `run` (config [web])"))
    _export_arguments(add_command(sub, "export-cells", "write the verified cells kept (each signed report's cells) "
                                                       "as class sub-folders of images and cells.csv, to adapt the "
                                                       "model on a desktop"))
    _model_arguments(add_command(sub, "model", "install a model bundle on the device (checked, switched between "
                                               "specimens), roll back to the previous one, or show both"))
    for p in (cl, sub.choices["count"]):
        p.add_argument("--model", type=Path, default=None,
                       help="model bundle; default: $HEMATOVISION_MODEL, else the reference bundle")
        p.add_argument("--json", action="store_true", help="one JSON object per line, no progress bar")
        p.add_argument("--threads", type=_positive_int, default=None,
                       help="classifier threads; default: one per core")
        p.add_argument("--max-pixels", type=_pixel_count, default=None, metavar="N",
                       help="refuse images of more pixels; default: $HEMATOVISION_MAX_PIXELS, else 24 million")
    return parser


def _web_arguments(web: argparse.ArgumentParser) -> None:
    web.add_argument("reports", type=Path, metavar="REPORTS_FOLDER", help="the folder of JSON reports")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on; another than 127.0.0.1 needs "
                     "$HEMATOVISION_WEB_TOKEN (the password)")
    web.add_argument("--port", type=_positive_int, default=8080, help="TCP port")


def _export_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder to write (new or empty)")
    where = export.add_mutually_exclusive_group()
    where.add_argument("--config", type=Path, default=None,
                       help=f"the daemon's configuration: its state folder's verified cells (default {DEFAULT_CONFIG})")
    where.add_argument("--state", type=Path, metavar="DIR", help="a state folder (the device's, or a copy)")
    where.add_argument("--reports", type=Path, metavar="DIR",
                       help="a folder of reports signed on a desktop (hematovision-edge web DIR)")
    export.add_argument("--since", metavar="DATE", help="only cells signed at or after this date or time")
    export.add_argument("--specimen", action="append", default=[], metavar="ID",
                        help="only this specimen's cells (repeat for more)")
    export.add_argument("--force", action="store_true", help="write into a folder that is not empty")


def _model_arguments(model: argparse.ArgumentParser) -> None:
    model.add_argument("action", choices=("install", "rollback", "status"))
    model.add_argument("bundle", nargs="?", type=Path, metavar="BUNDLE", help="install: the bundle folder")
    model.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                       help="the daemon's configuration: its state folder holds the installed bundles")
    model.add_argument("--state", type=Path, metavar="DIR", help="a state folder (instead of the configuration's)")
    model.add_argument("--samples", type=Path, metavar="FOLDER", default=None,
                       help="install: class sub-folders of single-cell images the bundle classifies first; default: "
                            "the sample PBC cells installed with the package")
    model.add_argument("--threads", type=_positive_int, default=None, help="classifier threads; default: one per core")
    model.add_argument("--json", action="store_true", help="status: print one JSON object")


def _count_arguments(cn: argparse.ArgumentParser) -> None:
    cn.add_argument("inputs", nargs="+", metavar="FIELD_OR_FOLDER")
    cn.add_argument("--calibration", type=Path, help="calibration profile (hematovision-calibrate)")
    cn.add_argument("--scan", action="store_true", help="inputs are consecutive frames of one specimen")
    cn.add_argument("--target", type=_positive_int, default=100,
                    help="identified white cells to count: counting stops after the field that reaches it")
    cn.add_argument("--all", action="store_true", help="count every input, past the target")
    cn.add_argument("--wbc", type=white_count, metavar="X10E9_PER_L",
                    help="the specimen's white-cell count in 10^9/L: adds absolute counts per class")
    cn.add_argument("--report", type=Path, metavar="DIR",
                    help="write JSON, CSV and HTML reports into this folder (created if missing)")
    cn.add_argument("--specimen-id", default="specimen", help="id used in the report")
    cn.add_argument("--no-cell-images", action="store_true",
                    help="with --report: keep no image of each cell in its field (kept, the cells a person signs on "
                         "the web page are kept for export-cells)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
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
    from .service.control import specimen_main
    from .web.backend import StartRequest

    start = StartRequest(args.specimen_id, args.accession, args.operator, args.target, args.wbc)
    return specimen_main(args.config, args.action, start, args.json)


def _web(args) -> int:
    from .web.server import serve_folder

    return serve_folder(args.reports, args.host, args.port, os.environ.get("HEMATOVISION_WEB_TOKEN", ""))


def _export_cells(args) -> int:
    from .reports.export_cells import CellFilter, export_cells, parse_since

    wanted = CellFilter(parse_since(args.since) if args.since else None, tuple(args.specimen))
    counts = export_cells(_cells_root(args), args.out, wanted, args.force)
    print(f"{sum(counts.values())} verified cells written to {args.out}: "
          + ", ".join(f"{label} {n}" for label, n in sorted(counts.items())))
    return 0


def _cells_root(args) -> Path:
    """Where the verified cells are kept: --reports, --state, or the configuration's state folder."""
    if args.reports or args.state:
        return args.reports or args.state
    config = args.config or Path(DEFAULT_CONFIG)
    if args.config is None and not config.exists():
        raise DataError(f"say where the verified cells are: --state DIR (the device's state folder), --reports DIR "
                        f"(reports signed on a desktop) or --config FILE ({DEFAULT_CONFIG} does not exist)")
    from .config import load_config

    return load_config(config).state_dir()


def _model(args) -> int:
    from .service.models import change_lines, device_models, status_lines

    if (args.action == "install") != (args.bundle is not None):
        raise DataError("model install takes the bundle folder: hematovision-edge model install BUNDLE" if
                        args.action == "install" else f"model {args.action} takes no bundle")
    device = device_models(args.config, args.state, args.samples, args.threads)
    if args.action == "status":
        if args.json:
            current, previous = device.models.current(), device.models.previous()
            print(json.dumps({"folder": str(device.models.root), "current": current and current.to_dict(),
                              "previous": previous and previous.to_dict(), "history": device.models.history()}))
        else:
            print("\n".join(status_lines(device.models, device.fallback)))
        return 0
    if args.action == "install":
        change = device.models.install(args.bundle, device.checks, device.fallback)
    else:
        change = device.models.rollback(device.checks.threads)
    print("\n".join(change_lines(change)))
    return 0


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
            novelty = {} if p.novelty is None else {"novelty": round(p.novelty, 3), "unfamiliar": p.unfamiliar}
            print(json.dumps({"path": str(path), "label": p.label, "confidence": round(p.confidence, 4),
                              "probabilities": {k: round(v, 4) for k, v in p.probabilities.items()}, **novelty,
                              "cell": cell.to_json()}), flush=True)
        else:
            print(f"{path}\t{p.label}\t{p.confidence:.3f}\t({cell.scale_source} scale)")
    if failed:
        print(f"hematovision-edge: {len(paths) - failed} of {len(paths)} images classified, {failed} skipped",
              file=sys.stderr)
    return 1 if failed == len(paths) else 0


def _count(args) -> int:
    from .counting.checks import TrainingRange
    from .counting.count import CountRun, count_frames, expand_inputs
    from .counting.select import make_selector
    from .counting.tally import Counter
    from .vision.pipeline import FieldPipeline

    if args.report:
        _check_report_output(args.report, args.specimen_id)
    paths = expand_inputs(args.inputs)
    bundle = _bundle(args)
    profile = _profile(args.calibration)
    run = CountRun(Counter(bundle.classes, args.target), stop_at_target=not args.all, wbc_10e9_per_l=args.wbc,
                   training=TrainingRange.of(bundle))
    pipeline = FieldPipeline(bundle, profile)
    frames = count_frames(pipeline, paths, run, make_selector("scan" if args.scan else "fields", None), args.max_pixels)
    with _pending_cuts(args) as pending:
        _count_all(args, frames, len(paths), pending, pipeline, run)
        _write_outputs(args, paths, bundle, profile, run, pending)
    return 0


def _count_all(args, frames, n_paths: int, pending, pipeline, run) -> None:
    """Every input counted, with a progress bar (or a JSON line per field), and each cell's cut kept when wanted."""
    with progress_bar(n_paths, "counting", "field", progress_wanted(args, args.json)) as bar:
        for path, result in frames:
            bar.update()
            if pending is not None and result is not None and result.cells:
                pending.add(len(run.cells) - len(result.cells) + 1, [c.field for c in result.cells],
                            pipeline.field_cuts(result))
            if args.json and result is not None:
                print(json.dumps({"path": str(path), "width": result.width, "height": result.height,
                                  "cells": [c.to_json() for c in result.cells]}), flush=True)


def _write_outputs(args, paths, bundle, profile, run, pending) -> None:
    """The differential on stdout and, with --report, the report files and the cells' cuts. Raises DataError when
    no input could be counted."""
    if len(run.skipped_files) == len(paths):
        path, reason = run.skipped_files[0]
        first = reason if reason.startswith(path) else f"{path}: {reason}"
        raise DataError(f"none of the {len(paths)} input(s) could be counted, so no differential and no report "
                        f"(first: {first}); give microscope fields as .jpg, .png, .bmp or .tif images")
    summary = run.summary()
    print(json.dumps({"summary": summary}) if args.json else format_table(summary))
    if args.report:
        _write_reports(args, bundle, profile, run)
        if pending is not None:
            pending.finish()


def _pending_cuts(args):
    """With --report: each counted cell's image in its field, kept beside the reports until the report is signed."""
    if not args.report or args.no_cell_images:
        return contextlib.nullcontext()
    from .reports.verified_cells import PendingCuts

    return PendingCuts(args.report, args.specimen_id)


def _check_report_output(folder: Path, specimen_id: str) -> None:
    """--report and --specimen-id checked before any counting. Raises DataError, ReportInvalid or LinkFailed
    naming the problem."""
    from .reports.files import check_report_folder, safe_file_stem

    if folder.exists() and not folder.is_dir():
        raise DataError(f"--report {folder}: this is a file, not a folder; give a folder for the JSON, CSV and "
                        "HTML reports (it is created if missing)")
    safe_file_stem(specimen_id)
    check_report_folder(folder)


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
    """The differential as a readable table (absolute counts beside the percentages when the white count
    is known), NRBC and rejected cells on lines of their own below it."""
    wbc = summary.get("wbc_10e9_per_l")
    lines = [f"Differential: {summary['identified']} cells identified, {summary['unidentified']} unidentified; "
             f"{summary['fields']} fields; {target_text(summary)}",
             f"{'class':<13}{'count':>6}{'%':>8}   95% CI" + ("       x10^9/L" if wbc else "")]
    for c in summary["classes"]:
        lo, hi = c["ci95"]
        absolute = f"   {c['absolute_10e9_per_l']:>8.2f}" if wbc else ""
        lines.append(f"{c['name']:<13}{c['count']:>6}{c['percent']:>8.1f}   {lo:5.1f} - {hi:5.1f}{absolute}")
    lines.append(f"{'unidentified':<13}{summary['unidentified']:>6}")
    if wbc:
        lines.append(f"white count {wbc:g} x10^9/L (entered): absolute count = white count x percent / 100")
    lines += _beside_lines(summary)
    for skipped in summary["skipped_files"]:
        lines.append(f"skipped {skipped['path']}: {skipped['reason']}")
    return "\n".join(lines + _flag_lines(summary))


def _flag_lines(summary: dict) -> list[str]:
    """What is wrong with the specimen and what to do, worst first; a banner first when every cell must be
    verified."""
    from .counting.checks import FULL_REVIEW, FULL_REVIEW_BANNER, SEVERITY

    flags = summary.get("flags", [])
    if not flags:
        return []
    full = any(SEVERITY.get(f["code"]) == FULL_REVIEW for f in flags)
    banner = [f"*** {FULL_REVIEW_BANNER.upper()} ***"] if full else []
    return ["", *banner, "Flags:", *(f"- {f['message']} [{f['code']}]" for f in flags)]


def target_text(summary: dict) -> str:
    """Where counting stood against its target: reached (and where counting stopped), or not."""
    target, reached = summary["target"], summary.get("target_reached_after")
    if not summary["target_reached"]:
        return f"target {target} NOT reached"
    if reached is None:
        return f"target {target} reached"
    text = f"target {target} reached after {reached['fields']} field(s)"
    if reached["identified"] != summary["identified"]:
        return f"{text} with {reached['identified']} identified; {summary['identified']} counted in all (--all)"
    left = summary.get("inputs_not_counted", 0)
    return text + (f", counting stopped there: {left} input(s) not counted (--all counts them)" if left else "")


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
            "check-config": _check_config, "specimen": _specimen, "web": _web, "model": _model,
            "export-cells": _export_cells}


if __name__ == "__main__":
    sys.exit(main())
