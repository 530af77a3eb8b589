"""`hematovision-train`: fit, evaluate and probe; argument parsing here, the work in the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hematovision.classes import DEFAULT_CLASSES
from hematovision.commandline import add_command, given_options, new_parser, setup_logging
from hematovision.errors import DataError, HematovisionError

logger = logging.getLogger("hematovision.train")

DESCRIPTION = """Train white-cell classifiers on grouped splits and evaluate them (desktop).

A run folder holds everything of one training: rerun the same `fit` command to resume it."""


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bccd", action="append", default=[], type=Path, metavar="DIR",
                   help="annotated fields: DIR/BCCD/{Annotations,JPEGImages} and DIR/labels.csv")
    p.add_argument("--folders", action="append", default=[], type=Path, metavar="DIR",
                   help="one sub-folder of images per class (the Kaggle layout), taken whole")
    p.add_argument("--cells", action="append", default=[], type=Path, metavar="DIR",
                   help="one sub-folder of single-cell images per class (the PBC layout): each image is "
                        "segmented, its scale measured from its red cells and its centre cell cut as the device does")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES), help="comma-separated class list")
    p.add_argument("--centres", default="boxes", choices=("boxes", "segmenter"),
                   help="crop field cells at the annotated box centre, or where the device's segmenter finds them")


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("hematovision-train", DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit = add_command(sub, "fit", "train a model (resumes when --out holds an unfinished run)")
    _data_args(fit)
    _fit_args(fit)
    ev = add_command(sub, "evaluate", "metrics.json and report.md of a run on a labelled set")
    ev.add_argument("run", type=Path)
    _data_args(ev)
    ev.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="the run's own split to use when no data is given")
    ev.add_argument("--out", type=Path, help="report folder (default RUN/eval/NAME)")
    probe = add_command(sub, "probe", "logistic head on frozen ImageNet vs random features")
    _data_args(probe)
    probe.add_argument("--backbone", default="efficientnet_lite0", help="feature extractor")
    probe.add_argument("--input-size", type=int, default=224, help="crop side in pixels")
    probe.add_argument("--seed", type=int, default=0, help="random seed")
    _origins_args(add_command(sub, "kaggle-origins", "match Kaggle images to the BCCD fields they were made from"))
    hold = add_command(sub, "hold-out", "draw a seeded, class-stratified test set of groups and write it as a CSV")
    _data_args(hold)
    hold.add_argument("--fraction", type=float, default=0.15, help="share of each class's groups")
    hold.add_argument("--seed", type=int, default=0, help="random seed")
    hold.add_argument("--out", required=True, type=Path, help="CSV to write (group, label)")
    _adapt_args(add_command(sub, "adapt", "re-fit a bundle's head on a site's verified cells (no TensorFlow needed)"))
    return parser


def _adapt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, type=Path, metavar="BUNDLE", help="the bundle to adapt (e.g. models/reference)")
    p.add_argument("--verified", required=True, action="append", type=Path, metavar="DIR",
                   help="verified cells (hematovision-edge export-cells --out DIR), or class sub-folders of "
                        "single-cell images; repeatable")
    p.add_argument("--out", required=True, type=Path, metavar="RUN",
                   help="run folder: adapt.json (figures, verdict) and, when the gate passes, bundle/")
    p.add_argument("--site", help="the site's name in the bundle (default: from the folder names)")
    p.add_argument("--site-share", type=float, default=0.7, help="share of the training weight on the site's cells")
    p.add_argument("--views", type=int, default=8, choices=range(1, 9), metavar="1-8",
                   help="rotations and flips of each site cell learned from")
    p.add_argument("--max-original-drop", type=float, default=1.0,
                   help="points of accuracy or macro-F1 any original lab's held-out cells may lose")
    p.add_argument("--min-macro-f1", type=float, default=0.80, help="floor: site cells' cross-validated macro-F1")
    p.add_argument("--min-cells", type=int, default=5, help="least verified cells of each class given")
    p.add_argument("--threads", type=int, default=None, help="LiteRT threads; default: one per core")


def _fit_args(fit: argparse.ArgumentParser) -> None:
    fit.add_argument("--out", required=True, type=Path, help="run folder")
    fit.add_argument("--restart", action="store_true",
                     help="start again in a run folder that holds a run made with other settings (the old run is "
                          "moved aside to OUT.replaced-DATE)")
    fit.add_argument("--backbone", default="efficientnet_b0",
                     choices=("efficientnet_b0", "resnet50", "efficientnet_lite0", "tiny_cnn"), help="network")
    fit.add_argument("--weights", default="imagenet", help="imagenet, none, or a local weights file")
    fit.add_argument("--input-size", type=int, default=224, help="crop side in pixels")
    fit.add_argument("--crop-um", type=float, default=24.0, help="crop side in micrometres")
    fit.add_argument("--batch-size", type=int, default=32, help="crops per training step")
    fit.add_argument("--head-epochs", type=int, default=8, help="phase 1: frozen backbone")
    fit.add_argument("--finetune-epochs", type=int, default=22, help="phase 2: top layers")
    fit.add_argument("--finetune-fraction", type=float, default=0.3, help="share of backbone layers tuned")
    fit.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of phase 1")
    fit.add_argument("--finetune-lr", type=float, default=1e-4, help="learning rate of phase 2")
    fit.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    fit.add_argument("--augment", default="full", choices=("full", "stain", "crosslab", "geometric", "none"),
                     help="full: geometry and strong colour/stain; stain: geometry and mild stain and exposure; "
                          "crosslab: wider zoom, stronger stain, defocus, sharpening, JPEG and noise; "
                          "geometric: rotation, zoom, flips only")
    fit.add_argument("--colour", default="none", choices=("none", "reinhard", "reinhard+blur"),
                     help="standardisation of every crop, in training and on the device: Reinhard colour "
                          "transfer to fixed Lab statistics, and a slight blur")
    fit.add_argument("--lab-repeat-max", type=int, default=1,
                     help="repeat a smaller lab's training cells toward the largest lab's count, at most this "
                          "often per epoch; 1: never")
    fit.add_argument("--seed", type=int, default=0, help="random seed of the split, augmentation and weights")
    fit.add_argument("--strategy", default="default", choices=("default", "mirrored", "multiworker"),
                     help="TensorFlow distribution strategy")
    fit.add_argument("--test-fields", type=Path, metavar="CSV", action="append", default=[],
                     help="hold these out as the test split (repeatable): a CSV with a bccd_field column (BCCD "
                          "fields and their re-photographed partners, e.g. train/kaggle_test_origins.csv) or a "
                          "group column (e.g. train/pbc_test_cells.csv, made by hold-out)")


def _origins_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kaggle", required=True, type=Path, metavar="DIR",
                   help="Kaggle images folder holding TRAIN/, TEST/, TEST_SIMPLE/")
    p.add_argument("--bccd", required=True, type=Path, metavar="DIR", help="BCCD folder (BCCD/JPEGImages, labels.csv)")
    p.add_argument("--split", action="append", default=[], help="split folder to match (repeatable; default TEST)")
    p.add_argument("--every", type=int, default=1, help="match every N-th image of each class folder")
    p.add_argument("--out", required=True, type=Path, help="origins CSV to write")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.given = given_options(build_parser(), argv)
    setup_logging(args, fmt="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        commands = {"fit": _fit, "evaluate": _evaluate, "probe": _probe, "kaggle-origins": _kaggle_origins,
                    "hold-out": _hold_out, "adapt": _adapt}
        return commands[args.command](args)
    except HematovisionError as err:
        print(f"hematovision-train: error: {err}", file=sys.stderr)
        return 1


def _load_data(args):
    from .datasets import Dataset, load_bccd, load_cell_images, load_folders

    classes = _classes(args.classes)
    data = Dataset()
    for root in args.bccd:
        data.extend(load_bccd(root, classes))
    for root in args.folders:
        data.extend(load_folders(root, classes))
    for root in args.cells:
        data.extend(load_cell_images(root, classes))
    if args.centres == "segmenter":
        from .device_crops import recentre_on_segmenter

        data = recentre_on_segmenter(data)
    return data, classes


def _fit(args) -> int:
    from .holdout import read_held_out
    from .recipe import RunPaths, TrainConfig, prepare_run, train

    run = RunPaths(args.out)
    if run.config.is_file():
        if args.restart:
            _move_aside(run.root)
        else:
            _check_resume(args, run)
            logger.info("resuming the run in %s with its stored configuration and manifest", run.root)
    if not run.config.is_file():
        data, classes = _load_data(args)
        if not data.samples:
            raise DataError("no training data: give --bccd DIR, --cells DIR and/or --folders DIR")
        config = TrainConfig(**{name: getattr(args, dest) for dest, name in FIT_SETTINGS.items()
                                if dest != "classes"}, classes=classes).validate()
        test_groups = read_held_out(args.test_fields) if args.test_fields else None
        prepare_run(run, config, data, test_groups, "+".join(p.name for p in args.test_fields) or None)
    print(train(run))
    return 0


# The fit options that set a stored training setting, by the setting's name in the run's config.json.
FIT_SETTINGS = {"backbone": "backbone", "weights": "weights", "classes": "classes", "input_size": "input_size",
                "crop_um": "crop_side_um", "batch_size": "batch_size", "head_epochs": "head_epochs",
                "finetune_epochs": "finetune_epochs", "finetune_fraction": "finetune_fraction",
                "head_lr": "head_lr", "finetune_lr": "finetune_lr", "patience": "patience", "augment": "augment",
                "colour": "colour", "lab_repeat_max": "lab_repeat_max", "seed": "seed", "strategy": "strategy"}


def _check_resume(args, run) -> None:
    """Raises DataError naming every option given now that differs from the stored run's settings."""
    differing = _setting_changes(args, run) + _data_changes(args, run)
    if differing:
        raise DataError(f"{run.root} holds a run made with other settings: {'; '.join(differing)}. Rerun without "
                        "these options to resume that run, give a new --out folder, or add --restart to move this "
                        "run aside and start again")


def _setting_changes(args, run) -> list[str]:
    from .recipe import TrainConfig

    stored = TrainConfig.load(run.config)
    out = []
    for dest, name in FIT_SETTINGS.items():
        now = _classes(args.classes) if dest == "classes" else getattr(args, dest)
        if dest in args.given and now != getattr(stored, name):
            out.append(f"--{dest.replace('_', '-')} {_shown(now)} (the run has {_shown(getattr(stored, name))})")
    return out


def _data_changes(args, run) -> list[str]:
    """Data options that name other sources (by folder name) or another test set than the run's."""
    stored = json.loads(run.data.read_text()) if run.data.is_file() else {}
    out = []
    if args.given & {"bccd", "folders", "cells"}:
        now = [f"{kind}:{p.name}" for kind in ("bccd", "folders", "cells") for p in getattr(args, kind)]
        if now != stored.get("sources", now):
            out.append(f"data {', '.join(now)} (the run has {', '.join(stored['sources'])})")
    if "test_fields" in args.given:
        now = "+".join(p.name for p in args.test_fields)
        held = (stored.get("test_groups") or {}).get("source") or "none"
        if now != held:
            out.append(f"--test-fields {now} (the run has {held})")
    return out


def _classes(text: str) -> tuple[str, ...]:
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _move_aside(root: Path) -> None:
    """--restart: the old run is kept, renamed, so that nothing trained is lost."""
    from datetime import datetime

    aside = root.with_name(f"{root.name}.replaced-{datetime.now():%Y%m%d-%H%M%S}")
    root.rename(aside)
    logger.info("--restart: the previous run in %s is now %s; starting again", root, aside)


def _evaluate(args) -> int:
    from .runs import evaluate_run

    data = _load_data(args)[0] if (args.bccd or args.folders or args.cells) else None
    folder = evaluate_run(args.run, data, args.split, args.out)
    print(json.dumps(json.loads((folder / "metrics.json").read_text()), indent=2))
    return 0


def _hold_out(args) -> int:
    from .holdout import draw_held_out, write_held_out

    data, _ = _load_data(args)
    rows = draw_held_out(data.samples, args.fraction, args.seed)
    write_held_out(rows, args.out)
    print(f"{len(rows)} groups held out, written to {args.out}")
    return 0


def _probe(args) -> int:
    from .probe import linear_probe

    data, classes = _load_data(args)
    result = linear_probe(data.samples, classes, args.backbone, args.input_size, args.seed)
    print(json.dumps(result, indent=2))
    return 0


def _kaggle_origins(args) -> int:
    import cv2

    from .datasets import read_bccd_labels
    from .kaggle_origins import index_bccd, label_disagreements, match_split, write_origins

    if args.every < 1:
        raise DataError(f"--every {args.every}: give 1 or more")
    cv2.setNumThreads(1)
    index = index_bccd(args.bccd)
    origins = [o for split in (args.split or ["TEST"]) for o in match_split(args.kaggle, split, index, every=args.every)]
    write_origins(origins, args.out)
    confident = [o for o in origins if o.match.confident]
    wrong = label_disagreements(origins, read_bccd_labels(args.bccd / "labels.csv"))
    print(json.dumps({"images": len(origins), "confident": len(confident),
                      "fields": len({o.match.field for o in confident}),
                      "groups": len({o.match.group for o in confident}),
                      "label_disagreements": [f"{o.split}/{o.label}/{o.image} -> {o.match.field}" for o in wrong]},
                     indent=2))
    return 0


def _adapt(args) -> int:
    from .adapt import AdaptGate, AdaptSettings
    from .adapt_run import default_site_name, run_adapt, summary_lines

    if not 0.0 < args.site_share < 1.0:
        raise DataError(f"--site-share {args.site_share}: give a share between 0 and 1 (e.g. 0.7)")
    settings = AdaptSettings(site_share=args.site_share, views=args.views)
    gate = AdaptGate(max_original_drop_pt=args.max_original_drop, min_site_macro_f1=args.min_macro_f1)
    meta = run_adapt(args.base, args.verified, args.out, args.site or default_site_name(args.verified), settings,
                     gate, args.threads, max(args.min_cells, 1))
    for line in summary_lines(meta):
        print(line)
    print(args.out / "bundle")
    return 0
