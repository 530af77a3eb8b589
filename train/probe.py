"""Linear probe: a logistic head on frozen backbone features, ImageNet versus random weights."""

from __future__ import annotations

import logging

import numpy as np

from hematovision.crop import CropGeometry
from hematovision.pixels import model_input

from .backbones import build_backbone
from .batches import crops_array
from .splits import SplitPlan, make_manifest

logger = logging.getLogger(__name__)


def pooled_features(backbone, crops: np.ndarray, batch: int = 32) -> np.ndarray:
    feats = [np.asarray(backbone(model_input(crops[i:i + batch]), training=False)).mean(axis=(1, 2))
             for i in range(0, len(crops), batch)]
    return np.concatenate(feats)


def linear_probe(samples, classes, backbone_name: str, input_size: int, seed: int) -> dict:
    """Balanced accuracy and macro-F1 of the same logistic head on both feature sets (grouped split)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows = make_manifest(samples, SplitPlan(val=0.0, test=0.3, seed=seed))
    train = [r.split == "train" for r in rows]
    crops = crops_array([r.sample for r in rows], CropGeometry(input_size=input_size))
    y = np.array([classes.index(r.sample.label) for r in rows])
    mask = np.array(train)
    result = {"backbone": backbone_name, "train_cells": int(mask.sum()), "test_cells": int((~mask).sum())}
    for weights in ("imagenet", None):
        feats = pooled_features(build_backbone(backbone_name, input_size, weights), crops)
        head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced"))
        head.fit(feats[mask], y[mask])
        pred = head.predict(feats[~mask])
        name = weights or "random"
        result[name] = {"accuracy": float((pred == y[~mask]).mean()),
                        "balanced_accuracy": float(balanced_accuracy_score(y[~mask], pred)),
                        "macro_f1": float(f1_score(y[~mask], pred, average="macro"))}
        logger.info("%s features: %s", name, result[name])
    return result
