"""Novelty at export: the pooled features as the model's second output, whitening, class centres, threshold."""

from __future__ import annotations

import logging

import numpy as np

from hematovision.novelty import NoveltyModel, whitening

logger = logging.getLogger(__name__)

FEATURE_LAYER = "pool"  # the classifier's pooled backbone features (train/model.py)
DIMS = 64  # whitened dimensions: far more than classes, far fewer than training cells
# Share of held-out cells of the training labs a threshold may call novel: the device's coverage
# on familiar cells is bought with it.
VAL_NOVEL_SHARE = 0.05


def with_feature_output(keras_model):
    """A two-output model: logits, and the pooled features they are computed from (the int8
    model's second output, for the novelty score and for re-fitting the head on a site's cells)."""
    import keras

    return keras.Model(keras_model.input, [keras_model.output, keras_model.get_layer(FEATURE_LAYER).output],
                       name=keras_model.name + "_features")


def fit_novelty(train_features: np.ndarray, train_groups: np.ndarray, val_features: np.ndarray,
                val_labs: np.ndarray, dims: int = DIMS, share: float = VAL_NOVEL_SHARE) -> NoveltyModel:
    """Whitening and a centre per training group (lab and class: `train_groups`) from the int8 model's
    pooled features of the training cells; the threshold that calls at most `share` of each training
    lab's held-out cells (validation split) novel, so a lab with few cells is not judged by another's.
    Fewer than four training cells per dimension fit fewer dimensions."""
    w, b = whitening(train_features, train_groups, max(min(dims, len(train_features) // 4), 2))
    z = train_features @ w + b
    centres = np.stack([z[train_groups == g].mean(0) for g in sorted(set(train_groups))])
    unfitted = NoveltyModel(w, b, centres, 1.0)
    scores = unfitted.scores(val_features)
    per_lab = {lab: float(np.quantile(scores[val_labs == lab], 1.0 - share)) for lab in sorted(set(val_labs))}
    threshold = max(per_lab.values())
    logger.info("novelty: %d pooled features whitened to %d dimensions on %d training cells, %d centres; "
                "threshold %.3f (each lab's: %s)", w.shape[0], w.shape[1], len(train_features), len(centres),
                threshold, ", ".join(f"{k} {v:.3f}" for k, v in per_lab.items()))
    return unfitted.with_threshold(threshold)
