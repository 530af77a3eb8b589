"""A site's classifier head: logistic regression on the int8 model's pooled features (head.npz in a bundle).

The shipped model ends in one dense layer over its pooled features; a site's adapted bundle keeps the
int8 backbone and replaces that layer with one re-fitted, in numpy, on the training labs' cells
(hematovision/reference_cells.py) and the site's verified ones. It runs wherever the device runs.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .errors import ModelInvalid

HEAD_FILE = "head.npz"
METHOD = "logistic"


@dataclass(frozen=True)
class Head:
    """logits = features @ weights + bias, one column per class of `classes`."""

    weights: np.ndarray  # (F, K)
    bias: np.ndarray  # (K,)
    classes: tuple[str, ...]

    @property
    def features(self) -> int:
        return int(self.weights.shape[0])

    def logits(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.weights + self.bias

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, weights=self.weights.astype(np.float32), bias=self.bias.astype(np.float32),
                 classes=np.array(self.classes, str))
        return out.getvalue()

    def to_dict(self) -> dict:
        """bundle.json's description; the sha256 of the file is added on writing."""
        return {"method": METHOD, "file": HEAD_FILE, "features": self.features, "classes": list(self.classes)}

    @classmethod
    def from_bytes(cls, data: bytes, n_features: int, classes: tuple[str, ...], where: str = HEAD_FILE) -> "Head":
        """Raises ModelInvalid naming `where` when the file is not a head for `n_features` and `classes`."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                w, b = np.asarray(npz["weights"], np.float64), np.asarray(npz["bias"], np.float64)
                names = tuple(str(c) for c in npz["classes"])
        except (KeyError, ValueError, OSError) as err:
            raise ModelInvalid(f"{where}: not a classifier head ({err}); adapt the bundle again") from err
        if w.shape != (n_features, len(classes)) or b.shape != (len(classes),):
            raise ModelInvalid(f"{where}: shapes {w.shape}, {b.shape} do not fit {n_features} features and "
                               f"{len(classes)} classes; adapt the bundle again")
        if names != tuple(classes):
            raise ModelInvalid(f"{where}: classes {list(names)} disagree with bundle.json's {list(classes)}; "
                               "adapt the bundle again")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ModelInvalid(f"{where}: holds values that are not finite numbers; adapt the bundle again")
        return cls(w, b, tuple(classes))


@dataclass(frozen=True)
class FitSettings:
    """Multinomial logistic regression by full-batch Adam on centred features (not scaled: the
    features a backbone uses most vary most), classes weighted equally."""

    l2: float = 1e-3  # on the weights, per unit of (normalised) sample weight
    steps: int = 1000
    learning_rate: float = 0.01
    seed: int = 0


def fit_head(features: np.ndarray, y: np.ndarray, classes: tuple[str, ...], sample_weight: np.ndarray | None = None,
             settings: FitSettings = FitSettings()) -> Head:
    """A head over `features` (N, F) for labels `y` (indices into `classes`), each cell weighted by
    `sample_weight` (default 1) and each class's cells by the inverse of its total weight, so a rare
    class counts as much as a common one. Deterministic; the centring is folded into the bias."""
    x = np.asarray(features, np.float32)
    mean = x.mean(0)
    z = x - mean
    k = len(classes)
    w_cell = np.ones(len(x)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    per_class = np.bincount(y, weights=w_cell, minlength=k)
    w_cell = (w_cell / per_class[y] / (w_cell / per_class[y]).sum()).astype(np.float32)
    onehot = np.eye(k, dtype=np.float32)[y]
    weights, bias = np.zeros((x.shape[1], k), np.float32), np.zeros(k, np.float32)
    moments = [np.zeros_like(weights), np.zeros_like(weights), np.zeros_like(bias), np.zeros_like(bias)]
    for step in range(1, settings.steps + 1):
        logits = z @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        residual = (p - onehot) * w_cell[:, None]
        grads = (z.T @ residual + settings.l2 * weights, residual.sum(0))
        weights, bias = _adam((weights, bias), grads, moments, step, settings.learning_rate)
    return Head(weights.astype(np.float64), (bias - mean @ weights).astype(np.float64), tuple(classes))


def _adam(params, grads, moments, step: int, lr: float, b1: float = 0.9, b2: float = 0.999):
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = moments[2 * i], moments[2 * i + 1]
        m[...] = b1 * m + (1 - b1) * g
        v[...] = b2 * v + (1 - b2) * g * g
        out.append(p - lr * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + 1e-8))
    return tuple(out)
