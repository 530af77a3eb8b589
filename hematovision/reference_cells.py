"""The training labs' cells as the int8 model's pooled features, kept in a bundle (reference_cells.npz).

A site's head re-fit (`hematovision-train adapt`) learns from these beside the site's own cells so it
does not forget the labs the model came from, and is checked on their held-out cells: all of it from
the bundle alone, without the training images, on a desktop or on the device.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from .errors import ModelInvalid

CELLS_FILE = "reference_cells.npz"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ReferenceCells:
    """Pooled features of labelled cells with their class, lab and split (train / val / test);
    `float_features` (same rows, NaN where not measured) are the float model's, for the held-out
    cells: what the int8 model's features are compared with."""

    features: np.ndarray  # (N, F) float32, the int8 model's dequantized features
    labels: np.ndarray  # (N,) str
    labs: np.ndarray  # (N,) str
    splits: np.ndarray  # (N,) str, one of SPLITS
    float_features: np.ndarray | None = None  # (N, F) float32 or None
    logits: np.ndarray | None = None  # (N, K) the exported model's own int8 logits (NaN where not measured)

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, mask: np.ndarray) -> "ReferenceCells":
        pick = (lambda a: a[mask] if a is not None else None)
        return ReferenceCells(self.features[mask], self.labels[mask], self.labs[mask], self.splits[mask],
                              pick(self.float_features), pick(self.logits))

    def split(self, name: str) -> "ReferenceCells":
        return self.where(self.splits == name)

    @classmethod
    def concat(cls, parts: list["ReferenceCells"]) -> "ReferenceCells":
        """The parts' cells one after another; float features and logits missing in a part are NaN there."""
        def joined(name: str, width: int) -> np.ndarray | None:
            if all(getattr(p, name) is None for p in parts):
                return None
            return np.concatenate([getattr(p, name) if getattr(p, name) is not None
                                   else np.full((len(p), width), np.nan, np.float32) for p in parts]).astype(np.float32)
        k = max((p.logits.shape[1] for p in parts if p.logits is not None), default=0)
        return cls(np.concatenate([p.features for p in parts]).astype(np.float32),
                   *(np.concatenate([getattr(p, a) for p in parts]) for a in ("labels", "labs", "splits")),
                   joined("float_features", parts[0].features.shape[1]), joined("logits", k))

    def counts(self) -> dict:
        """{split: {lab: cells}}, for bundle.json."""
        return {s: {lab: int(np.sum((self.splits == s) & (self.labs == lab))) for lab in sorted(set(self.labs))}
                for s in SPLITS if np.any(self.splits == s)}

    def to_bytes(self) -> bytes:
        """A compressed .npz (no pickled objects): features as float16 (the int8 model's features
        take 256 values per dimension, so nothing is lost that the device has)."""
        out = io.BytesIO()
        arrays = {"features": self.features.astype(np.float16), "labels": self.labels.astype(str),
                  "labs": self.labs.astype(str), "splits": self.splits.astype(str)}
        if self.float_features is not None:
            arrays["float_features"] = self.float_features.astype(np.float16)
        if self.logits is not None:
            arrays["logits"] = self.logits.astype(np.float32)
        np.savez_compressed(out, **arrays)
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, n_features: int, where: str = CELLS_FILE) -> "ReferenceCells":
        """Raises ModelInvalid naming `where` for a file that is not a bundle's reference cells."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                features = np.asarray(npz["features"], np.float32)
                labels, labs, splits = (np.asarray(npz[k]).astype(str) for k in ("labels", "labs", "splits"))
                floats = np.asarray(npz["float_features"], np.float32) if "float_features" in npz else None
                logits = np.asarray(npz["logits"], np.float32) if "logits" in npz else None
        except (KeyError, ValueError, OSError) as err:
            raise ModelInvalid(f"{where}: not the reference cells of a bundle ({err}); re-export the bundle") from err
        n = len(labels)
        if features.shape != (n, n_features) or labs.shape != (n,) or splits.shape != (n,) \
                or (floats is not None and floats.shape != features.shape) \
                or (logits is not None and (logits.ndim != 2 or len(logits) != n)):
            raise ModelInvalid(f"{where}: shapes do not fit {n} cells of {n_features} features; re-export the bundle")
        if not set(splits) <= set(SPLITS) or not np.all(np.isfinite(features)):
            raise ModelInvalid(f"{where}: unknown splits or values that are not finite numbers; re-export the bundle")
        return cls(features, labels, labs, splits, floats, logits)


def subsample(groups: np.ndarray, per_group: int, seed: int = 0) -> np.ndarray:
    """Indices of at most `per_group` cells of each group (seeded, sorted): a lab's rare class keeps
    all its cells, a common one is thinned."""
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(groups == g))[:per_group] for g in sorted(set(groups))]
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, int)
