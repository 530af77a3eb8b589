"""`hematovision-train`: fit, evaluate and probe; argument parsing only, the work is in the library."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hematovision.classes import DEFAULT_CLASSES
from hematovision.errors import DataError, HematovisionError

logger = logging.getLogger("hematovision.train")


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
    parser = argparse.ArgumentParser(prog="hematovision-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a model (resumes when --out holds an unfinished run)")
    _data_args(fit)
    fit.add_argument("--out", required=True, type=Path, help="run folder")
    fit.add_argument("--backbone", default="efficientnet_b0",
                     choices=("efficientnet_b0", "resnet50", "efficientnet_lite0", "tiny_cnn"))
    fit.add_argument("--weights", default="imagenet", help="imagenet, none, or a local weights file")
    fit.add_argument("--input-size", type=int, default=224)
    fit.add_argument("--crop-um", type=float, default=24.0, help="crop side in micrometres")
    fit.add_argument("--batch-size", type=int, default=32)
    fit.add_argument("--head-epochs", type=int, default=8, help="phase 1: frozen backbone")
    fit.add_argument("--finetune-epochs", type=int, default=22, help="phase 2: top layers")
    fit.add_argument("--finetune-fraction", type=float, default=0.3, help="share of backbone layers tuned")
    fit.add_argument("--head-lr", type=float, default=1e-3)
    fit.add_argument("--finetune-lr", type=float, default=1e-4)
    fit.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs")
    fit.add_argument("--augment", default="full", choices=("full", "stain", "crosslab", "geometric", "none"),
                     help="full: geometry and strong colour/stain; stain: geometry and mild stain and exposure; "
                          "crosslab: wider zoom, stronger stain, defocus, sharpening, JPEG and noise; "
                          "geometric: rotation, zoom, flips only")
    fit.add_argument("--colour", default="none", choices=("none", "reinhard", "reinhard+blur"),
                     help="standardisation of every crop, in training and on the device: Reinhard colour "
                          "transfer to fixed Lab statistics, and a slight blur (default none)")
    fit.add_argument("--lab-repeat-max", type=int, default=1,
                     help="repeat a smaller lab's training cells toward the largest lab's count, at most this "
                          "often per epoch (default 1: never)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--strategy", default="default", choices=("default", "mirrored", "multiworker"))
    fit.add_argument("--test-fields", type=Path, metavar="CSV", action="append", default=[],
                     help="hold these out as the test split (repeatable): a CSV with a bccd_field column (BCCD "
                          "fields and their re-photographed partners, e.g. train/kaggle_test_origins.csv) or a "
                          "group column (e.g. train/pbc_test_cells.csv, made by hold-out)")
    ev = sub.add_parser("evaluate", help="metrics.json and report.md of a run on a labelled set")
    ev.add_argument("run", type=Path)
    _data_args(ev)
    ev.add_argument("--split", default="test", choices=("train", "val", "test"),
                    help="the run's own split to use when no data is given (default: test)")
    ev.add_argument("--out", type=Path, help="report folder (default RUN/eval/NAME)")
    probe = sub.add_parser("probe", help="logistic head on frozen ImageNet vs random features")
    _data_args(probe)
    probe.add_argument("--backbone", default="efficientnet_lite0")
    probe.add_argument("--input-size", type=int, default=224)
    probe.add_argument("--seed", type=int, default=0)
    _origins_args(sub.add_parser("kaggle-origins", help="match Kaggle images to the BCCD fields they were made from"))
    hold = sub.add_parser("hold-out", help="draw a seeded, class-stratified test set of groups and write it as a CSV")
    _data_args(hold)
    hold.add_argument("--fraction", type=float, default=0.15, help="share of each class's groups (default 0.15)")
    hold.add_argument("--seed", type=int, default=0, help="default 0")
    hold.add_argument("--out", required=True, type=Path, help="CSV to write (group, label)")
    return parser


def _origins_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kaggle", required=True, type=Path, metavar="DIR",
                   help="Kaggle images folder holding TRAIN/, TEST/, TEST_SIMPLE/")
    p.add_argument("--bccd", required=True, type=Path, metavar="DIR", help="BCCD folder (BCCD/JPEGImages, labels.csv)")
    p.add_argument("--split", action="append", default=[], help="split folder to match (repeatable; default TEST)")
    p.add_argument("--every", type=int, default=1, help="match every N-th image of each class folder")
    p.add_argument("--out", required=True, type=Path, help="origins CSV to write")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        commands = {"fit": _fit, "evaluate": _evaluate, "probe": _probe, "kaggle-origins": _kaggle_origins,
                    "hold-out": _hold_out}
        return commands[args.command](args)
    except HematovisionError as err:
        print(f"hematovision-train: error: {err}", file=sys.stderr)
        return 1


def _load_data(args):
    from .datasets import Dataset, load_bccd, load_cell_images, load_folders

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip())
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
        logger.info("resuming the run in %s with its stored configuration and manifest", run.root)
    else:
        data, classes = _load_data(args)
        if not data.samples:
            raise DataError("no training data: give --bccd DIR, --cells DIR and/or --folders DIR")
        config = TrainConfig(
            backbone=args.backbone, weights=args.weights, classes=classes, input_size=args.input_size,
            crop_side_um=args.crop_um, batch_size=args.batch_size, head_epochs=args.head_epochs,
            finetune_epochs=args.finetune_epochs, finetune_fraction=args.finetune_fraction,
            head_lr=args.head_lr, finetune_lr=args.finetune_lr, patience=args.patience,
            augment=args.augment, colour=args.colour, lab_repeat_max=args.lab_repeat_max, seed=args.seed,
            strategy=args.strategy).validate()
        test_groups = read_held_out(args.test_fields) if args.test_fields else None
        prepare_run(run, config, data, test_groups, "+".join(p.name for p in args.test_fields) or None)
    print(train(run))
    return 0


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
