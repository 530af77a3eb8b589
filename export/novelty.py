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


def fit_novelty(train_features: np.ndarray, train_y: np.ndarray, n_classes: int, val_features: np.ndarray,
                dims: int = DIMS, share: float = VAL_NOVEL_SHARE) -> NoveltyModel:
    """Whitening and class centres from the int8 model's pooled features of the training cells; the
    threshold that calls `share` of the held-out cells of the training labs (validation split)
    novel. Fewer than four training cells per dimension fit fewer dimensions."""
    w, b = whitening(train_features, train_y, max(min(dims, len(train_features) // 4), 2))
    z = train_features @ w + b
    means = np.stack([z[train_y == k].mean(0) if (train_y == k).any() else np.full(w.shape[1], 1e6)
                      for k in range(n_classes)])  # a class with no training cell is never nearest
    unfitted = NoveltyModel(w, b, means, 1.0)
    threshold = float(np.quantile(unfitted.scores(val_features), 1.0 - share))
    logger.info("novelty: %d pooled features whitened to %d dimensions on %d training cells; threshold %.3f "
                "calls %.0f%% of the validation cells novel", w.shape[0], w.shape[1], len(train_features),
                threshold, 100 * share)
    return unfitted.with_threshold(threshold)
