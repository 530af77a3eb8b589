"""Pixel size from a stage-micrometer image: the ruling's period by profile analysis."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from hematovision.errors import CalibrationError

from .profile import STAGE_MICROMETER, PixelSize

logger = logging.getLogger(__name__)

_NOT_FOUND = (
    "centre the micrometer ruling in the field, focus on it, and use a magnification that shows at least "
    "{n} divisions across the image"
)


@dataclass(frozen=True)
class RulingSettings:
    """Limits of the ruling search, in image pixels."""

    min_period_px: float = 4.0
    min_lines: int = 4
    min_peak_ratio: float = 8.0     # spectral peak over the median spectrum
    max_residual: float = 0.25      # a line further than this (in periods) from the fit is dropped


DEFAULT_RULING = RulingSettings()


@dataclass(frozen=True)
class Ruling:
    """The ruling found in an image: line angle, period in pixels and its standard uncertainty."""

    angle_deg: float
    period_px: float
    period_sd_px: float
    lines: int


def ruling_angle(gray: np.ndarray) -> float:
    """Direction (degrees) of the ruling's lines from the image's structure tensor."""
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    jxx, jyy, jxy = float((gx * gx).mean()), float((gy * gy).mean()), float((gx * gy).mean())
    gradient_deg = 0.5 * math.degrees(math.atan2(2 * jxy, jxx - jyy))
    return gradient_deg + 90.0


def line_profile(gray: np.ndarray, angle_deg: float) -> np.ndarray:
    """Mean intensity across the image along the ruling's lines, sampled perpendicular to them."""
    h, w = gray.shape
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle_deg - 90.0, 1.0)
    rotated = cv2.warpAffine(gray, matrix, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    valid = cv2.warpAffine(np.ones_like(gray), matrix, (w, h), flags=cv2.INTER_NEAREST, borderValue=0)
    weight = valid.sum(axis=0)
    keep = weight > 0.5 * weight.max()
    profile = rotated.sum(axis=0)[keep] / weight[keep]
    return profile.astype(np.float64)


def rough_period(profile: np.ndarray, settings: RulingSettings) -> float:
    """Period (pixels) of the strongest spectral peak of a line profile.

    Raises CalibrationError when no peak stands out: no regular ruling in the image.
    """
    n = profile.size
    detrended = profile - np.polyval(np.polyfit(np.arange(n), profile, 2), np.arange(n))
    spectrum = np.abs(np.fft.rfft(detrended * np.hanning(n), 8 * n))
    freqs = np.fft.rfftfreq(8 * n)
    band = (freqs >= settings.min_lines / n) & (freqs <= 1.0 / settings.min_period_px)
    if not band.any():
        raise CalibrationError(f"the image is too small to hold a ruling; {_NOT_FOUND.format(n=settings.min_lines)}")
    peak = int(np.argmax(np.where(band, spectrum, 0)))
    ratio = spectrum[peak] / (np.median(spectrum[band]) + 1e-9)
    if ratio < settings.min_peak_ratio:
        raise CalibrationError(
            f"no micrometer ruling found (no regular line pattern, peak ratio {ratio:.1f}); "
            + _NOT_FOUND.format(n=settings.min_lines)
        )
    return 1.0 / freqs[peak]


def line_positions(profile: np.ndarray, period: float) -> np.ndarray:
    """Sub-pixel centres of the dark lines: the deepest point within half a period, refined by a parabola."""
    smooth = cv2.GaussianBlur(profile.reshape(1, -1), (0, 0), sigmaX=max(period / 12, 0.7)).ravel()
    half = max(int(period / 2), 1)
    lowest = cv2.erode(smooth.reshape(1, -1), np.ones((1, 2 * half + 1), np.uint8), borderType=cv2.BORDER_REPLICATE)
    median = np.median(smooth)
    dips = np.flatnonzero((smooth == lowest.ravel()) & (smooth < median - 0.3 * (median - smooth.min())))
    dips = dips[(dips > 0) & (dips < smooth.size - 1)]
    a, b, c = smooth[dips - 1], smooth[dips], smooth[dips + 1]
    curvature = a - 2 * b + c
    offset = np.where(curvature > 0, 0.5 * (a - c) / np.where(curvature > 0, curvature, 1), 0.0)
    return dips + offset


def fit_period(positions: np.ndarray, period: float, settings: RulingSettings) -> tuple[float, float, int]:
    """Least-squares period and its standard error from line positions; outlying lines are dropped."""
    index = np.round((positions - positions[0]) / period)
    keep = np.ones(positions.size, bool)
    for _ in range(2):
        if keep.sum() < settings.min_lines:
            break
        slope, offset = np.polyfit(index[keep], positions[keep], 1)
        keep = np.abs(positions - (slope * index + offset)) < settings.max_residual * slope
    n = int(keep.sum())
    if n < settings.min_lines:
        raise CalibrationError(
            f"only {n} ruling lines could be located; " + _NOT_FOUND.format(n=settings.min_lines)
        )
    slope, offset = np.polyfit(index[keep], positions[keep], 1)
    residual = positions[keep] - (slope * index[keep] + offset)
    spread = np.sum((index[keep] - index[keep].mean()) ** 2)
    sd = math.sqrt(max(np.sum(residual**2) / max(n - 2, 1), 1e-4) / spread)
    return float(slope), sd, n


def find_ruling(image: np.ndarray, settings: RulingSettings = DEFAULT_RULING) -> Ruling:
    """Angle and period of the ruling in an RGB uint8 or grayscale image of a stage micrometer.

    Works at any rotation; the period is measured perpendicular to the lines.
    Raises CalibrationError when no ruling with enough divisions can be found.
    """
    gray = image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    angle = ruling_angle(gray)
    profile = line_profile(gray, angle)
    rough = rough_period(profile, settings)
    period, sd, lines = fit_period(line_positions(profile, rough), rough, settings)
    logger.info("ruling: angle %.2f deg, period %.3f +- %.3f px over %d lines", angle % 180, period, sd, lines)
    return Ruling(angle_deg=angle % 180, period_px=period, period_sd_px=sd, lines=lines)


def pixel_size_from_ruling(image: np.ndarray, division_um: float, settings: RulingSettings = DEFAULT_RULING) -> PixelSize:
    """Micrometres per pixel from a stage-micrometer image whose divisions are `division_um` apart.

    Raises CalibrationError for a non-positive division or a ruling that cannot be found.
    """
    if not division_um > 0:
        raise CalibrationError(f"--division-um must be positive, got {division_um}; use the ruling's spacing, e.g. 10")
    ruling = find_ruling(image, settings)
    um = division_um / ruling.period_px
    return PixelSize(um_per_pixel=um, uncertainty=um * ruling.period_sd_px / ruling.period_px, source=STAGE_MICROMETER)
