"""Blank-field calibration: smooth flat-field gain map, white balance and exposure level."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import cv2
import numpy as np

from hematovision.errors import CalibrationError

from .profile import BlankCalibration

logger = logging.getLogger(__name__)

_CHANNELS = ("red", "green", "blue")


@dataclass(frozen=True)
class BlankSettings:
    """How blank fields are measured and when they are refused (fractions of full scale)."""

    grid: tuple[int, int] = (13, 17)          # rows, columns of the stored gain map
    fit_blocks: tuple[int, int] = (48, 64)    # block means the smooth surface is fitted to
    degree: int = 6                           # of the 2-D polynomial surface
    white_target: float = 0.92                # a blank field is corrected to this level
    min_level: float = 0.15                   # darker frames are refused
    min_channel_level: float = 0.05           # a colour channel darker than this is refused
    max_saturated: float = 0.001              # fraction of pixels at full scale allowed
    structure_contrast: float = 0.10          # a pixel this far from the smooth field is "structure"
    max_structure: float = 0.002              # fraction of structure pixels allowed in a blank
    max_frame_spread: float = 0.05            # brightness difference allowed between frames


DEFAULT_BLANK = BlankSettings()


@dataclass(frozen=True)
class ExposureLimits:
    """Limits for any calibration image: too dark, a dark colour channel, too many saturated pixels."""

    min_level: float = 0.15
    min_channel_level: float = 0.05
    max_saturated: float = 0.01


def check_exposure(image: np.ndarray, name: str, limits: ExposureLimits = ExposureLimits()) -> float:
    """Return the mean green level (fraction of full scale) of an RGB uint8 image.

    Raises CalibrationError naming `name` when it is saturated or too dark, with what to change.
    """
    saturated = float((image.max(axis=2) >= 254).mean())
    if saturated > limits.max_saturated:
        raise CalibrationError(
            f"{name} is saturated ({saturated:.1%} of pixels at full scale); lower the exposure time, "
            "the gain or the lamp brightness and retake it"
        )
    means = image.reshape(-1, 3).mean(0) / 255.0
    if means[1] < limits.min_level or means.min() < limits.min_channel_level:
        raise CalibrationError(
            f"{name} is too dark (mean {_CHANNELS[int(means.argmin())]} level {means.min():.1%} of full scale); "
            "raise the lamp brightness or exposure time and check that nothing blocks the light path"
        )
    return float(means[1])


def _design(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """Polynomial terms u^i v^j (i + j <= degree) for coordinates in -1..1."""
    return np.stack([u**i * v**j for i in range(degree + 1) for j in range(degree + 1 - i)], axis=-1)


def _block_coords(rows: int, cols: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalized (-1..1, corners at +-1) coordinates of the centres of a rows x cols block grid."""
    x = ((np.arange(cols) + 0.5) * width / cols - 0.5) / (width - 1) * 2 - 1
    y = ((np.arange(rows) + 0.5) * height / rows - 0.5) / (height - 1) * 2 - 1
    return np.meshgrid(x, y)


def fit_surface(channel: np.ndarray, settings: BlankSettings = DEFAULT_BLANK) -> np.ndarray:
    """Smooth polynomial fit of one image channel, evaluated on the corner-aligned node grid.

    Block means are fitted by least squares twice, the second time without blocks that stand out
    (dust); returns an array of settings.grid shape.
    """
    rows, cols = settings.fit_blocks
    blocks = cv2.resize(channel.astype(np.float32), (cols, rows), interpolation=cv2.INTER_AREA).ravel()
    u, v = _block_coords(rows, cols, *channel.shape)
    design = _design(u.ravel(), v.ravel(), settings.degree).astype(np.float64)
    keep = np.ones(blocks.size, bool)
    for _ in range(2):
        a = design[keep]
        coef = np.linalg.solve(a.T @ a, a.T @ blocks[keep])  # normal equations: 28 terms, well conditioned
        residual = blocks - design @ coef
        mad = np.median(np.abs(residual[keep])) + 1e-6
        keep = np.abs(residual) < 5 * 1.4826 * mad + 0.002 * blocks.mean()
    gu, gv = np.meshgrid(np.linspace(-1, 1, settings.grid[1]), np.linspace(-1, 1, settings.grid[0]))
    return (_design(gu.ravel(), gv.ravel(), settings.degree) @ coef).reshape(settings.grid)


@lru_cache(maxsize=8)
def _node_maps(grid_shape: tuple[int, int], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """remap coordinates taking each image pixel to its place on the corner-aligned node grid."""
    rows, cols = grid_shape
    mx = np.linspace(0, cols - 1, width, dtype=np.float32)
    my = np.linspace(0, rows - 1, height, dtype=np.float32)
    return np.broadcast_to(mx, (height, width)).copy(), np.broadcast_to(my[:, None], (height, width)).copy()


def upsample_gain(gain: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear interpolation of a 3 x rows x cols node map to a height x width x 3 float32 map."""
    mx, my = _node_maps(gain.shape[1:], height, width)
    nodes = np.ascontiguousarray(np.moveaxis(gain, 0, -1), dtype=np.float32)
    return cv2.remap(nodes, mx, my, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def structure_fraction(image: np.ndarray, surface: np.ndarray, contrast: float) -> float:
    """Fraction of pixels that differ from the smooth field `surface` (H x W x 3) by more than `contrast`."""
    ratio = image.astype(np.float32) / np.maximum(surface, 1.0)
    ratio = cv2.blur(ratio, (5, 5))
    return float((np.abs(ratio - 1.0).max(axis=2) > contrast).mean())


def _check_frames(images: Sequence[np.ndarray], settings: BlankSettings) -> np.ndarray:
    """Per-frame exposure checks; returns each frame's green level."""
    if not images:
        raise CalibrationError("no blank-field images given; take at least one of an empty area of the slide")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise CalibrationError(f"blank-field images differ in size {sorted(shapes)}; take them all at one resolution")
    rows, cols = (2 * n for n in settings.fit_blocks)  # two pixels a side for every block of the fit at least
    height, width = images[0].shape[:2]
    if height < rows or width < cols:
        raise CalibrationError(f"blank-field images of {width}x{height} pixels are too small for a flat field "
                               f"(at least {cols}x{rows}); give full-resolution frames of the camera")
    limits = ExposureLimits(settings.min_level, settings.min_channel_level, settings.max_saturated)
    levels = np.array([check_exposure(im, f"blank frame {i + 1}", limits) for i, im in enumerate(images)])
    spread = float((levels.max() - levels.min()) / levels.mean())
    if spread > settings.max_frame_spread:
        raise CalibrationError(
            f"the blank frames differ in brightness by {spread:.1%} (auto-exposure is probably on); "
            "fix exposure and gain (picamera2: AeEnable False) and retake them"
        )
    return levels


def measure_blank(images: Sequence[np.ndarray], settings: BlankSettings = DEFAULT_BLANK) -> BlankCalibration:
    """Flat field, white balance and exposure level from RGB uint8 images of a blank field.

    Raises CalibrationError for frames of different sizes, saturated or dark frames, frames whose
    brightness drifts, and a "blank" field with cells or debris in it.
    """
    levels = _check_frames(images, settings)
    mean = np.mean([im.astype(np.float32) for im in images], axis=0)
    surfaces = np.stack([fit_surface(mean[:, :, c], settings) for c in range(3)])
    if surfaces.min() <= 1.0:
        raise CalibrationError("the blank field falls to black towards an edge; centre the illumination and retake")
    full = upsample_gain(surfaces, *mean.shape[:2])
    for i, image in enumerate(images):
        fraction = structure_fraction(image, full, settings.structure_contrast)
        if fraction > settings.max_structure:
            raise CalibrationError(
                f"blank frame {i + 1} is not blank: {fraction:.1%} of it differs from a smooth field by more than "
                f"{settings.structure_contrast:.0%} (cells, debris or an edge); move to an empty area of the slide "
                "or remove the slide, clean the optics, and retake"
            )
    channel_means = surfaces.reshape(3, -1).mean(1)
    gain = channel_means[:, None, None] / surfaces
    logger.info("blank field: %d frame(s), level %.3f, white balance %s", len(images), levels.mean(),
                np.round(channel_means[1] / channel_means, 3).tolist())
    return BlankCalibration(
        gain=tuple(tuple(tuple(row) for row in ch) for ch in gain.tolist()),
        white_balance=tuple((channel_means[1] / channel_means).tolist()),
        level=float(channel_means[1] / 255.0), white_target=settings.white_target, frames=len(images),
        frame_spread=float((levels.max() - levels.min()) / levels.mean()),
    )


def non_uniformity(image: np.ndarray, blocks: tuple[int, int] = (12, 16)) -> float:
    """Residual non-uniformity of a field: (max - min) / mean of the block means of its luminance."""
    gray = image.astype(np.float32).mean(axis=2) if image.ndim == 3 else image.astype(np.float32)
    means = cv2.resize(gray, (blocks[1], blocks[0]), interpolation=cv2.INTER_AREA)
    return float((means.max() - means.min()) / means.mean())
