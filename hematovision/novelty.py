"""Novelty of a cell: how far its features lie from every class of the training cells."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .errors import ModelInvalid

METHOD = "mahalanobis"
ARRAYS_FILE = "novelty.npz"  # the projection and class centres, beside model.tflite in a bundle
SHRINKAGE = 0.1  # of the mean within-class variance, added to every direction's variance


@dataclass(frozen=True)
class NoveltyModel:
    """The centres of the training cells' groups (one per laboratory and class) in a whitened space of
    the model's pooled features, and the score above which a cell is "unlike anything I was trained on".

    z = features @ projection + offset whitens the training cells' within-group scatter (the shared
    covariance of a group-conditional Gaussian model), so the Mahalanobis distance is the Euclidean
    one there; the score is its square to the nearest centre divided by the number of dimensions
    (about 1 for a typical training cell). A centre per lab keeps a lab with few cells from being
    judged against another lab's centre.
    """

    projection: np.ndarray  # (F, D)
    offset: np.ndarray  # (D,)
    centres: np.ndarray  # (M, D)
    threshold: float

    @property
    def dims(self) -> int:
        return int(self.projection.shape[1])

    @property
    def features(self) -> int:
        return int(self.projection.shape[0])

    def whiten(self, features: np.ndarray) -> np.ndarray:
        return np.asarray(features, np.float64) @ self.projection + self.offset

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(N, F) pooled features -> (N,) novelty scores."""
        z = self.whiten(features)
        d2 = ((z[:, None, :] - self.centres[None]) ** 2).sum(-1)
        return d2.min(axis=1) / self.dims

    def is_novel(self, features: np.ndarray) -> np.ndarray:
        return self.scores(features) > self.threshold

    def with_threshold(self, threshold: float) -> "NoveltyModel":
        return NoveltyModel(self.projection, self.offset, self.centres, float(threshold))

    def arrays_bytes(self) -> bytes:
        """The arrays as an .npz file (no pickled objects)."""
        out = io.BytesIO()
        np.savez(out, projection=self.projection.astype(np.float32), offset=self.offset.astype(np.float32),
                 centres=self.centres.astype(np.float32))
        return out.getvalue()

    def to_dict(self) -> dict:
        """bundle.json's description; the arrays go to ARRAYS_FILE (its sha256 is added on export)."""
        return {"method": METHOD, "features": self.features, "dims": self.dims, "threshold": self.threshold,
                "file": ARRAYS_FILE}

    @classmethod
    def from_arrays(cls, data: bytes, threshold: float, n_features: int, where: str = ARRAYS_FILE) -> "NoveltyModel":
        """Raises ModelInvalid naming `where` for a file that is not the arrays a bundle needs."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: np.asarray(npz[k], np.float64) for k in ("projection", "offset", "centres")}
        except (KeyError, ValueError, OSError) as err:
            raise ModelInvalid(f"{where}: not the novelty arrays of a bundle ({err}); re-export the bundle") from err
        p, b, m = arrays["projection"], arrays["offset"], arrays["centres"]
        if p.ndim != 2 or p.shape[0] != n_features or b.shape != (p.shape[1],) or m.ndim != 2 \
                or m.shape[1] != p.shape[1] or len(m) == 0:
            raise ModelInvalid(f"{where}: shapes {p.shape}, {b.shape}, {m.shape} do not fit {n_features} features; "
                               "re-export the bundle")
        if not all(np.all(np.isfinite(a)) for a in (p, b, m)):
            raise ModelInvalid(f"{where}: holds values that are not finite numbers; re-export the bundle")
        return cls(p, b, m, threshold)


def whitening(features: np.ndarray, labels: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with z = f @ W + b whitening the within-group scatter (`labels`: a group per cell) of
    `features` in its `dims`
    leading directions, each direction's variance shrunk toward the mean variance so directions
    the few training cells barely span do not blow up.

    Raises ModelInvalid when there are fewer cells than dimensions to fit.
    """
    features = np.asarray(features, np.float64)
    if len(features) <= dims:
        raise ModelInvalid(f"novelty: {len(features)} training cells cannot fit {dims} feature dimensions")
    within = np.concatenate([features[labels == k] - features[labels == k].mean(0) for k in np.unique(labels)])
    eigvals, eigvecs = np.linalg.eigh(within.T @ within / len(within))
    top = np.argsort(eigvals)[::-1][:dims]
    shrunk = eigvals[top] + SHRINKAGE * max(float(eigvals.mean()), 1e-12)
    w = eigvecs[:, top] / np.sqrt(shrunk)
    return w, -features.mean(0) @ w
