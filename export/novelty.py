"""Novelty at export: the whitened feature output folded into the model, class centres and threshold fitted."""

from __future__ import annotations

import logging

import numpy as np

from hematovision.novelty import NoveltyModel, whitening
from hematovision.pixels import model_input

logger = logging.getLogger(__name__)

FEATURE_LAYER = "pool"  # the classifier's pooled backbone features (train/model.py)
DIMS = 64  # whitened feature dimensions: far more than classes, far fewer than training cells
# Share of held-out cells of the training labs a threshold may call novel: the device's coverage
# on familiar cells is bought with it.
VAL_NOVEL_SHARE = 0.05


def feature_model(keras_model):
    """The classifier's pooled features, one row per crop (float, before the logits layer)."""
    import keras

    return keras.Model(keras_model.input, keras_model.get_layer(FEATURE_LAYER).output)


def with_novelty_output(keras_model, crops: np.ndarray, labels: np.ndarray, dims: int = DIMS):
    """A two-output model (logits, whitened features): the whitening fitted on `crops` (the training
    cells as the device sees them) is a fixed Dense layer on the pooled features. Fewer than four
    training cells per dimension fit fewer dimensions, but always more than there are classes (the
    device tells the outputs apart by their size)."""
    import keras

    features = _predict(feature_model(keras_model), crops)
    n_classes = int(keras_model.output.shape[-1])
    w, b = whitening(features, labels, max(min(dims, len(crops) // 4), n_classes + 1))
    dense = keras.layers.Dense(w.shape[1], name="novelty_features", trainable=False)
    out = dense(keras_model.get_layer(FEATURE_LAYER).output)
    dense.set_weights([w, b])
    logger.info("novelty: %d pooled features whitened to %d dimensions on %d training cells",
                features.shape[1], w.shape[1], len(crops))
    return keras.Model(keras_model.input, [keras_model.output, out], name=keras_model.name + "_novelty")


def _predict(model, crops: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(model(model_input(crops[i:i + batch]), training=False))
                           for i in range(0, len(crops), batch)])


def fit_novelty(train_features: np.ndarray, train_y: np.ndarray, n_classes: int, val_features: np.ndarray,
                share: float = VAL_NOVEL_SHARE) -> NoveltyModel:
    """Class centres from the int8 model's features of the training cells; the threshold that calls
    `share` of the held-out cells of the training labs (validation split) novel."""
    means = np.stack([train_features[train_y == k].mean(0) if (train_y == k).any()
                      else np.full(train_features.shape[1], np.inf) for k in range(n_classes)])
    means = np.where(np.isfinite(means), means, 1e6)  # a class with no training cell is never nearest
    unfitted = NoveltyModel(means, 1.0)
    threshold = float(np.quantile(unfitted.scores(val_features), 1.0 - share))
    return NoveltyModel(means, threshold)
