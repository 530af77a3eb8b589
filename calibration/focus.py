"""Focus: a per-frame sharpness score and the threshold learned from a through-focus series."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

from hematovision.errors import CalibrationError

from .profile import FocusCalibration

logger = logging.getLogger(__name__)

# Gaussian scales (pixels) of the fine and coarse gradient energies compared by the score.
_FINE_SIGMA = 1.0
_COARSE_SIGMA = 3.0
# Below this mean squared gradient (of the mean-normalized image) a frame has no structure at all.
_MIN_ENERGY = 1e-6


@dataclass(frozen=True)
class FocusSettings:
    """How the threshold is placed between the best frame of a series and its most blurred one."""

    keep_fraction: float = 0.5       # threshold = worst + keep_fraction * (best - worst)
    min_range: float = 0.1           # best - worst below this: the series never left focus
    min_frames: int = 3


DEFAULT_FOCUS = FocusSettings()


def _gradient_energy(gray: np.ndarray, sigma: float) -> float:
    smooth = cv2.GaussianBlur(gray, (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT_101)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT_101)
    return float(np.mean(gx * gx + gy * gy))


@lru_cache(maxsize=1)
def _noise_energy() -> tuple[float, float]:
    """Fine and coarse gradient energies of unit-variance white noise (subtracted as the noise part)."""
    noise = np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)
    return _gradient_energy(noise, _FINE_SIGMA), _gradient_energy(noise, _COARSE_SIGMA)


def noise_sigma(gray: np.ndarray) -> float:
    """Standard deviation of white pixel noise, by Immerkaer's Laplacian-difference estimate."""
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    response = cv2.filter2D(gray, cv2.CV_32F, kernel)[1:-1, 1:-1]
    return float(np.sqrt(np.pi / 2) * np.abs(response).mean() / 6.0)


def focus_score(image: np.ndarray) -> float:
    """Sharpness of a frame or crop, 0 (no detail) to 1 (sharp), comparable across sizes and content.

    Takes a grayscale or RGB image of any dtype. The score is 1 - E3 / E1, where Ek is the mean
    squared gradient after Gaussian smoothing at k pixels: blur removes fine detail first, so the
    ratio depends on how sharp the edges are, not on how many cells are in view or the brightness.
    The part of both energies that white pixel noise explains (its level estimated from the frame)
    is subtracted first, so sensor noise does not look like detail; a frame with no structure
    beyond noise (a blank field) scores 0.
    """
    gray = image.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2)
    gray = gray / max(float(gray.mean()), 1e-6)
    variance = noise_sigma(gray) ** 2
    noise_fine, noise_coarse = _noise_energy()
    fine = _gradient_energy(gray, _FINE_SIGMA) - variance * noise_fine
    if fine < _MIN_ENERGY:
        return 0.0
    coarse = max(_gradient_energy(gray, _COARSE_SIGMA) - variance * noise_coarse, 0.0)
    return float(min(max(0.0, 1.0 - coarse / fine), 1.0))


def learn_threshold(images: Sequence[np.ndarray], settings: FocusSettings = DEFAULT_FOCUS) -> FocusCalibration:
    """Focus threshold from a through-focus series of one field (frames in any order).

    Raises CalibrationError for fewer than settings.min_frames frames or a series whose scores
    barely change (it never went out of focus, or never came into it).
    """
    if len(images) < settings.min_frames:
        raise CalibrationError(
            f"a through-focus series needs at least {settings.min_frames} frames, got {len(images)}; "
            "step the focus from below to above best focus, one frame per step"
        )
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise CalibrationError(f"the focus frames differ in size {sorted(shapes)}; take them all at one resolution")
    scores = np.array([focus_score(im) for im in images])
    best, worst = float(scores.max()), float(scores.min())
    if best - worst < settings.min_range:
        raise CalibrationError(
            f"the focus scores of the series barely change ({worst:.3f} to {best:.3f}); take it through best focus "
            "and well out of it on both sides, on a field with cells"
        )
    if int(scores.argmax()) in (0, len(images) - 1):
        logger.warning("the sharpest frame is at an end of the series; it may not have passed through best focus")
    threshold = worst + settings.keep_fraction * (best - worst)
    logger.info("focus scores %s -> threshold %.3f", np.round(scores, 3).tolist(), threshold)
    return FocusCalibration(threshold=threshold, best_score=best, series_scores=tuple(scores.tolist()))
