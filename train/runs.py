"""Evaluating a finished run on its own held-out split or on another labelled set."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hematovision.errors import DataError, ModelInvalid

from .datasets import Dataset
from .evaluate import compute_metrics, predict_logits, softmax, write_report
from .recipe import RunPaths, TrainConfig
from .splits import read_manifest, samples_of

logger = logging.getLogger(__name__)


def load_run_model(run: RunPaths):
    """The trained Keras model of a run. Raises ModelInvalid when the run has not finished."""
    import keras

    if not run.model.is_file():
        raise ModelInvalid(f"{run.model}: no trained model; finish the run with hematovision-train fit")
    return keras.models.load_model(run.model)


def evaluate_run(root: Path, data: Dataset | None, split: str, out: Path | None) -> Path:
    """Write metrics.json and report.md for a run; returns the report folder.

    With `data` None the run's own `split` of its manifest is used. Raises DataError when the
    chosen set has no cells of the run's classes.
    """
    run = RunPaths(Path(root))
    config = TrainConfig.load(run.config)
    if data is None:
        samples, name = samples_of(read_manifest(run.manifest), split), split
    else:
        samples, name = [s for s in data.samples if s.label in config.classes], "+".join(data.sources)
    if not samples:
        raise DataError(f"no cells of classes {list(config.classes)} to evaluate on")
    model = load_run_model(run)
    probs = softmax(predict_logits(model, samples, config.geometry, colour=config.colour_standard))
    y = np.array([config.classes.index(s.label) for s in samples])
    metrics = compute_metrics(probs, y, config.classes)
    folder = out or run.root / "eval" / name.replace(":", "_").replace("/", "_")
    write_report(metrics, folder, f"{config.backbone} on {name}", run.history)
    logger.info("accuracy %.3f, macro-F1 %.3f on %d cells -> %s", metrics.accuracy, metrics.macro_f1,
                metrics.n, folder)
    return folder
