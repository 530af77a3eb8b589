"""Confidence that means something: softmax temperature and the "unidentified" threshold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hematovision.train.evaluate import expected_calibration_error, softmax


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of the labels (golden search)."""
    def nll(log_t: float) -> float:
        p = softmax(logits, float(np.exp(log_t)))
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) < nll(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def rejection_threshold(probs: np.ndarray, y: np.ndarray, max_rejected: float) -> float:
    """Highest confidence threshold that rejects at most `max_rejected` of the correct cells."""
    correct = probs.argmax(axis=1) == y
    conf = np.sort(probs.max(axis=1)[correct])
    if len(conf) == 0:
        return 0.0
    allowed = int(np.floor(max_rejected * len(conf)))
    return float(conf[allowed]) if allowed < len(conf) else float(conf[-1])


@dataclass(frozen=True)
class Confidence:
    """What the device needs to turn logits into a label or "unidentified"."""

    temperature: float
    threshold: float
    max_rejected_correct: float
    ece_before: float
    ece_after: float
    rejected_correct: float
    rejected_wrong: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def fit_confidence(val_logits: np.ndarray, val_y: np.ndarray, max_rejected: float = 0.02,
                   labs: np.ndarray | None = None) -> Confidence:
    """Fit the temperature and threshold on the validation split and report their effect there.

    With `labs` (each cell's laboratory) the threshold rejects at most `max_rejected` of every lab's
    correct cells (the lowest of the labs' thresholds), so a lab whose cells the model is less sure
    of is not left mostly unidentified by a threshold set on a surer lab."""
    t = fit_temperature(val_logits, val_y)
    before, after = softmax(val_logits), softmax(val_logits, t)
    labs = np.zeros(len(val_y), int) if labs is None else np.asarray(labs)
    threshold = min(rejection_threshold(after[labs == lab], val_y[labs == lab], max_rejected) for lab in set(labs))
    correct = after.argmax(axis=1) == val_y
    rejected = after.max(axis=1) < threshold
    return Confidence(
        temperature=t, threshold=threshold, max_rejected_correct=max_rejected,
        ece_before=expected_calibration_error(before, val_y),
        ece_after=expected_calibration_error(after, val_y),
        rejected_correct=float(rejected[correct].mean()) if correct.any() else 0.0,
        rejected_wrong=float(rejected[~correct].mean()) if (~correct).any() else 0.0,
    )
