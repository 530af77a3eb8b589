"""Novelty of a cell: how far its features lie from every class of the training cells."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelInvalid

METHOD = "mahalanobis"
SHRINKAGE = 0.1  # of the mean within-class variance, added to every direction's variance


@dataclass(frozen=True)
class NoveltyModel:
    """Class centres of the training cells in the model's whitened feature space, and the score above
    which a cell is "unlike anything I was trained on".

    The model's second output is already whitened (the export folds the projection into it), so the
    Mahalanobis distance is the Euclidean one there; the score is its square divided by the number
    of dimensions (about 1 for a typical training cell).
    """

    class_means: np.ndarray  # (K, D)
    threshold: float

    @property
    def dims(self) -> int:
        return int(self.class_means.shape[1])

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N,) novelty scores: the squared distance to the nearest class centre / D."""
        features = np.asarray(features, np.float64)
        d2 = ((features[:, None, :] - self.class_means[None]) ** 2).sum(-1)
        return d2.min(axis=1) / self.dims

    def is_novel(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features) > self.threshold

    def to_dict(self) -> dict:
        return {"method": METHOD, "dims": self.dims, "threshold": self.threshold,
                "class_means": np.round(self.class_means, 5).tolist()}

    @classmethod
    def from_dict(cls, d, n_classes: int, where: str = "novelty") -> "NoveltyModel | None":
        """None when the bundle has no novelty model (made before it existed). Raises ModelInvalid
        naming `where` and the field for anything malformed."""
        if d is None:
            return None
        try:
            method, threshold = d["method"], float(d["threshold"])
            means = np.asarray(d["class_means"], np.float64)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelInvalid(f"{where}: needs method, threshold and class_means ({err!r}); re-export the bundle") from err
        if method != METHOD:
            raise ModelInvalid(f"{where}.method {method!r} is unknown; this device reads {METHOD!r}")
        if means.ndim != 2 or means.shape[0] != n_classes or not np.all(np.isfinite(means)):
            raise ModelInvalid(f"{where}.class_means must be {n_classes} rows of finite numbers, one per class")
        if not (np.isfinite(threshold) and threshold > 0):
            raise ModelInvalid(f"{where}.threshold {threshold} must be a number above 0")
        return cls(means, threshold)


def whitening(features: np.ndarray, labels: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with z = f @ W + b whitening the within-class scatter of `features` in its `dims`
    leading directions (the shared covariance of the class-conditional Gaussian model).

    Raises ModelInvalid when there are fewer cells than dimensions to fit.
    """
    features = np.asarray(features, np.float64)
    if len(features) <= dims:
        raise ModelInvalid(f"novelty: {len(features)} training cells cannot fit {dims} feature dimensions")
    within = np.concatenate([features[labels == k] - features[labels == k].mean(0) for k in np.unique(labels)])
    eigvals, eigvecs = np.linalg.eigh(within.T @ within / len(within))
    top = np.argsort(eigvals)[::-1][:dims]
    # Shrunk toward the mean variance, so directions the few training cells barely span do not blow up.
    shrunk = eigvals[top] + SHRINKAGE * max(float(eigvals.mean()), 1e-12)
    w = eigvecs[:, top] / np.sqrt(shrunk)
    return w.astype(np.float32), (-features.mean(0) @ w).astype(np.float32)
