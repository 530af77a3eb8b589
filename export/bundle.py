"""Export a training run as a device bundle: convert, measure, gate, fit confidence and novelty, write atomically."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

import hematovision
from hematovision.novelty import ARRAYS_FILE
from hematovision.reference_cells import CELLS_FILE, ReferenceCells, subsample
from hematovision.edge.vision.model_bundle import BUNDLE_FORMAT, Int8Model
from hematovision.errors import HematovisionError
from hematovision.pixels import PREPROCESSING
from hematovision.train.augment import AugmentParams
from hematovision.train.batches import crops_array, sample_crop
from hematovision.train.datasets import lab_of, licences_of
from hematovision.train.evaluate import compute_metrics, softmax
from hematovision.train.recipe import RunPaths, TrainConfig
from hematovision.train.runs import load_run_model
from hematovision.train.splits import manifest_hash, read_manifest, samples_of

from .confidence import fit_confidence
from .files import write_bundle
from .convert import convert_int8, non_int8_ops
from .gate import GateMargins, judge
from .measure import abstentions, abstentions_by_lab, evaluate_split, int8_outputs, metrics_by_lab
from .novelty import VAL_NOVEL_SHARE, fit_novelty, with_feature_output

logger = logging.getLogger(__name__)


REFERENCE_PER_GROUP = 80  # training cells kept per lab and class in reference_cells.npz


class GateRefused(HematovisionError):
    """The int8 model lost too much against the float model; no bundle was written."""


@dataclass(frozen=True)
class ExportOptions:
    margins: GateMargins = field(default_factory=GateMargins)
    calibration_crops: int = 300
    per_channel: bool = True
    max_rejected_correct: float = 0.02
    threads: int | None = None


def training_stain_stats(samples, max_fields: int = 200) -> tuple[dict, dict]:
    """Lab colour statistics of the training images, drawn evenly from each laboratory: the pooled
    statistics (the target `hematovision-calibrate colour` maps another microscope's smears toward),
    and each lab's range of per-image statistics (what a specimen's frames are checked against)."""
    from hematovision.calibration.colour import stain_stats
    from hematovision.pixels import read_rgb

    by_lab: dict[str, list[str]] = {}
    for s in samples:
        by_lab.setdefault(lab_of(s), []).append(s.path)
    per_lab = max_fields // max(len(by_lab), 1)
    images = {lab: [read_rgb(p) for p in sorted(set(paths))[::max(1, len(set(paths)) // per_lab)][:per_lab]]
              for lab, paths in sorted(by_lab.items())}
    pooled = stain_stats(im for ims in images.values() for im in ims).to_dict()
    return pooled, {lab: image_stats_range([stain_stats([im]) for im in ims]) for lab, ims in images.items()}


def image_stats_range(stats) -> dict:
    """Mean and standard deviation, over images, of each image's Lab means and spreads."""
    values = np.array([list(s.lab_mean) + list(s.lab_std) for s in stats])
    return {"keys": ["L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std"], "images": len(values),
            "mean": values.mean(0).round(3).tolist(), "sd": values.std(0).round(3).tolist()}


def calibration_crops(samples, config: TrainConfig, n: int, plain: np.ndarray | None = None) -> np.ndarray:
    """At least `n` crops from the training split, cut exactly as in training.

    Every training cell once as the device sees it (`plain`, when already cut), then augmented
    copies (the stain and colour range the device will meet) until there are `n`.
    """
    crops = list(crops_array(samples, config.geometry, config.colour_standard) if plain is None else plain)
    rng = np.random.default_rng(config.seed)
    while len(crops) < n:
        crops.append(sample_crop(samples[len(crops) % len(samples)], config.geometry, rng, AugmentParams(),
                                 config.colour_standard))
    return np.stack(crops)


# What export_run tells its `step` callback as it starts each stage, in order.
EXPORT_STEPS = ("loading the run", "cutting training crops", "converting to int8", "measuring held-out cells",
                "fitting confidence and novelty", "writing the bundle")


def export_run(run_dir: Path, out_dir: Path, options: ExportOptions = ExportOptions(),
               step: Callable[[str], None] = lambda name: None) -> dict:
    """Convert a finished run to int8, gate it, and write the bundle folder; returns bundle.json.
    `step` is called with each name of EXPORT_STEPS as that stage starts (a progress bar's hook).

    Raises GateRefused (nothing written) when int8 loses more than the margins allow.
    """
    step(EXPORT_STEPS[0])
    run = RunPaths(Path(run_dir))
    config = TrainConfig.load(run.config)
    rows = read_manifest(run.manifest)
    keras_model = load_run_model(run)
    step(EXPORT_STEPS[1])
    train_s = samples_of(rows, "train")
    train_crops = crops_array(train_s, config.geometry, config.colour_standard)
    step(EXPORT_STEPS[2])
    tflite = convert_int8(with_feature_output(keras_model),
                          calibration_crops(train_s, config, options.calibration_crops, train_crops),
                          options.per_channel)
    int8 = Int8Model(tflite, options.threads)
    step(EXPORT_STEPS[3])
    two_outputs = with_feature_output(keras_model)
    test = evaluate_split(two_outputs, int8, samples_of(rows, "test"), config)
    val = evaluate_split(two_outputs, int8, samples_of(rows, "val"), config)
    step(EXPORT_STEPS[4])
    train_groups = np.array([f"{lab_of(s)}:{s.label}" for s in train_s])
    train_outputs = int8_outputs(int8, train_crops)
    novelty = fit_novelty(train_outputs[1], train_groups, val.int8_features, val.labs)
    cells = reference_cells(train_s, train_outputs, val, test, config)
    meta = _metadata(run, config, rows, tflite, int8, test, val, novelty, options)
    meta["reference_cells"] = _cells_entry(cells)
    _log_figures(meta)
    if not meta["gate"]["passed"]:
        raise GateRefused("model refused, no bundle written: " + "; ".join(meta["gate"]["reasons"]))
    step(EXPORT_STEPS[5])
    return write_bundle(Path(out_dir), tflite, meta, {ARRAYS_FILE: novelty.arrays_bytes(), CELLS_FILE: cells.to_bytes()})


def reference_cells(train_s, train_outputs, val, test, config) -> ReferenceCells:
    """The training labs' cells as int8 features and logits (at most REFERENCE_PER_GROUP training cells per
    lab and class; every validation and test cell), with the float model's features of the held-out ones."""
    labs = np.array([lab_of(s) for s in train_s])
    labels = np.array([s.label for s in train_s])
    keep = subsample(np.char.add(np.char.add(labs, ":"), labels), REFERENCE_PER_GROUP, config.seed)
    logits, features = train_outputs
    train = ReferenceCells(features[keep], labels[keep], labs[keep], np.full(len(keep), "train"), None, logits[keep])
    names = np.array(config.classes)
    held = [ReferenceCells(ev.int8_features, names[ev.y], ev.labs, np.full(len(ev.y), split), ev.float_features,
                           ev.int8_logits) for split, ev in (("val", val), ("test", test))]
    return ReferenceCells.concat([train, *held])


def _cells_entry(cells: ReferenceCells) -> dict:
    data = cells.to_bytes()
    return {"file": CELLS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "cells": cells.counts(),
            "per_group_train": REFERENCE_PER_GROUP,
            "use": "the training labs' cells as pooled int8 features: what a site's head re-fit keeps and is checked on"}


def _metadata(run, config, rows, tflite, int8, test, val, novelty, options) -> dict:
    float_m = compute_metrics(softmax(test.float_logits), test.y, config.classes)
    int8_m = compute_metrics(softmax(test.int8_logits), test.y, config.classes)
    gate = judge(float_m, int8_m, test.float_logits.argmax(1), test.int8_logits.argmax(1), test.y, options.margins)
    confidence = fit_confidence(val.int8_logits, val.y, options.max_rejected_correct, val.labs)
    test_probs = softmax(test.int8_logits, confidence.temperature)
    train_um = [r.sample.um_per_pixel for r in rows if r.sample.um_per_pixel]
    data = json.loads(run.data.read_text())
    stain, stain_range = training_stain_stats(samples_of(rows, "train"))
    return {
        "format": BUNDLE_FORMAT,
        "name": f"hematovision-{config.backbone}",
        "project_version": hematovision.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": list(config.classes),
        "input": {"size": config.input_size, "dtype": int8.input_q.dtype, "color_order": "RGB"},
        "preprocessing": PREPROCESSING,
        "colour": config.colour_standard.to_dict(),
        "crop_geometry": {**config.geometry.to_dict(),
                          "trained_um_per_pixel": float(np.median(train_um)) if train_um else None},
        "quantization": {"input": int8.input_q.__dict__, "output": int8.output_q.__dict__,
                         "features": int8.features_q.__dict__,
                         "per_channel": options.per_channel, "calibration_crops": options.calibration_crops,
                         "non_int8_ops": non_int8_ops(tflite)},
        "confidence": {**confidence.to_dict(),
                       "ece_test_before": int8_m.ece,
                       "ece_test_after": compute_metrics(test_probs, test.y, config.classes).ece},
        "novelty": {**novelty.to_dict(), "sha256": hashlib.sha256(novelty.arrays_bytes()).hexdigest(),
                    "fitted_on": "validation split (held-out cells of the training labs)",
                    "val_novel_share": VAL_NOVEL_SHARE},
        "abstention": {"val": abstentions(val, confidence.temperature, confidence.threshold, novelty),
                       "test_by_lab": abstentions_by_lab(test, confidence.temperature, confidence.threshold, novelty)},
        "metrics": {"split": "test", "float": float_m.to_dict(), "int8": int8_m.to_dict(),
                    "by_lab": metrics_by_lab(test, config.classes)},
        "gate": {"max_accuracy_drop_pt": options.margins.accuracy_pt,
                 "max_recall_drop_pt": options.margins.recall_pt,
                 "min_top1_agreement": options.margins.min_agreement,
                 "min_macro_f1": options.margins.min_macro_f1, "min_recall": options.margins.min_recall,
                 **gate.to_dict()},
        "provenance": {"run": run.root.name, "backbone": config.backbone, "weights": config.weights,
                       "manifest_sha256": manifest_hash(run.manifest),
                       "sources": data["sources"], "train_config": asdict(config),
                       "data_licences": licences_of(samples_of(rows, "train")),  # the labs trained on
                       "test_groups": data.get("test_groups")},  # held-out groups, when fixed (--test-fields)
        "stain_stats": stain, "stain_range": stain_range,
        "model_sha256": hashlib.sha256(tflite).hexdigest(),
        "model_bytes": len(tflite),
    }


def _log_figures(meta: dict) -> None:
    f, q, g = meta["metrics"]["float"], meta["metrics"]["int8"], meta["gate"]
    logger.info("held-out %s: float accuracy %.4f macro-F1 %.4f | int8 accuracy %.4f macro-F1 %.4f | "
                "top-1 agreement %.4f", meta["metrics"]["split"], f["accuracy"], f["macro_f1"],
                q["accuracy"], q["macro_f1"], g["top1_agreement"])
    for c in meta["classes"]:
        logger.info("  %-11s recall float %.3f int8 %.3f agreement %s", c, f["per_class"][c]["recall"],
                    q["per_class"][c]["recall"], g["top1_agreement_per_class"][c])
    conf = meta["confidence"]
    logger.info("temperature %.3f, unidentified below %.3f; ECE val %.4f -> %.4f, test %.4f -> %.4f",
                conf["temperature"], conf["threshold"], conf["ece_before"], conf["ece_after"],
                conf["ece_test_before"], conf["ece_test_after"])
    logger.info("gate %s %s", "PASSED" if g["passed"] else "REFUSED", "; ".join(g["reasons"]))
