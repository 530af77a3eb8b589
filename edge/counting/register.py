"""Registration: how far the stage moved between two frames, by phase correlation."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from hematovision.errors import DataError

logger = logging.getLogger(__name__)

LOW_RESPONSE = "low response"
DISAGREE = "overlap does not match"
SMALL_OVERLAP = "overlap too small"
TOO_FAST = "implausible shift"
MAX_RESIDUAL_PX = 12.0  # working pixels; a larger residual shift leaves the first estimate


@dataclass(frozen=True)
class RegisterParams:
    """Settings of frame-to-frame registration; lengths in um.

    A shift is trusted when the phase-correlation peak is strong enough, the two frames
    agree where the shift says they overlap (normalised cross-correlation), and the stage
    moved no faster than `max_speed_um` per frame. Phase correlation cannot see shifts over
    half the field (they wrap around): the overlap check is what catches those.
    """

    work_um_per_pixel: float = 0.2  # frames are registered at this pixel size (never upsampled)
    max_speed_um: float = 30.0  # per frame; a larger shift is a jump, not a pan
    min_response: float = 0.05  # phase-correlation peak below this: no shift found
    min_agreement: float = 0.5  # correlation of the overlapping parts of the two frames
    min_overlap: float = 0.2  # fraction of the field the two frames must share


DEFAULT_REGISTER = RegisterParams()


@dataclass(frozen=True, eq=False)
class WorkFrame:
    """A frame prepared for registration: grayscale uint8 at the working resolution."""

    gray: np.ndarray
    um_per_pixel: float  # of the full-resolution frame
    scale: float  # working pixels per full-resolution pixel

    @property
    def work_um_per_pixel(self) -> float:
        return self.um_per_pixel / self.scale


@dataclass(frozen=True)
class Registration:
    """Stage motion from a reference frame to a frame: the new frame's pixel (x, y) shows
    what the reference showed at (x + dx, y + dy). `ok` is False when no shift is trusted."""

    shift_px: tuple[float, float]  # full-resolution pixels of the new frame
    shift_um: tuple[float, float]
    response: float  # phase-correlation peak, 0..1
    agreement: float  # correlation of the overlapping parts, -1..1
    ok: bool
    reason: str = ""  # why not ok

    @property
    def distance_um(self) -> float:
        return math.hypot(*self.shift_um)


def prepare(image_rgb: np.ndarray, um_per_pixel: float, params: RegisterParams = DEFAULT_REGISTER) -> WorkFrame:
    """Grayscale, area-downscaled copy of an RGB uint8 frame for `register`.

    Raises DataError for a frame that is not HxWx3 uint8 or a pixel size that is not positive.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise DataError(f"registration needs an HxWx3 uint8 RGB frame, got {image_rgb.shape} {image_rgb.dtype}")
    if not um_per_pixel > 0:
        raise DataError(f"pixel size must be positive, got {um_per_pixel} um per pixel")
    gray = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2GRAY)
    scale = min(1.0, um_per_pixel / params.work_um_per_pixel)
    if scale < 1.0:
        h, w = gray.shape
        gray = cv2.resize(gray, (max(8, round(w * scale)), max(8, round(h * scale))), interpolation=cv2.INTER_AREA)
        scale = gray.shape[1] / w
    return WorkFrame(gray=gray, um_per_pixel=float(um_per_pixel), scale=float(scale))


@lru_cache(maxsize=8)
def _window(height: int, width: int) -> np.ndarray:
    return cv2.createHanningWindow((width, height), cv2.CV_32F)


def register(reference: WorkFrame, moving: WorkFrame, params: RegisterParams = DEFAULT_REGISTER,
             max_shift_um: float | None = None, guess_um: tuple[float, float] | None = None) -> Registration:
    """Stage motion from `reference` to `moving` (see Registration).

    `max_shift_um` bounds a plausible shift (default `params.max_speed_um`, one frame;
    math.inf when relocalising). With `guess_um` (a shift known to a few um) only the parts
    the guess says the frames share are correlated. Raises DataError when the frames differ in size.
    """
    if reference.gray.shape != moving.gray.shape:
        raise DataError(f"cannot register a {moving.gray.shape[::-1]} frame against a "
                        f"{reference.gray.shape[::-1]} one: keep the camera resolution fixed during a scan")
    if guess_um is None:
        dx, dy, response = _phase_shift(reference.gray, moving.gray)
    else:
        (dx, dy), response = (v / reference.work_um_per_pixel for v in guess_um), 1.0
    dx, dy, refined = _refine(reference.gray, moving.gray, dx, dy, params)
    response = response if guess_um is None else refined
    agreement, overlap = overlap_agreement(reference.gray, moving.gray, round(dx), round(dy))
    work_um = reference.work_um_per_pixel
    shift_um = (dx * work_um, dy * work_um)
    limit = params.max_speed_um if max_shift_um is None else max_shift_um
    reason = _verdict(params, response, agreement, overlap, math.hypot(*shift_um) > limit)
    return Registration(shift_px=(dx / reference.scale, dy / reference.scale), shift_um=shift_um,
                        response=float(response), agreement=agreement, ok=not reason, reason=reason)


def _phase_shift(reference: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    """(dx, dy, peak response) of the phase correlation of two same-size images, Hanning-windowed."""
    h, w = reference.shape
    (px, py), response = cv2.phaseCorrelate(reference.astype(np.float32), moving.astype(np.float32), _window(h, w))
    return -px, -py, float(response)


def _refine(reference: np.ndarray, moving: np.ndarray, dx: float, dy: float,
            params: RegisterParams) -> tuple[float, float, float]:
    """Correlate again the parts the two frames share at the whole-pixel shift: a small residual
    shift is measured without the pull towards zero that a large one suffers."""
    ix, iy = round(dx), round(dy)
    h, w = reference.shape
    if (w - abs(ix)) * (h - abs(iy)) < params.min_overlap * w * h or min(w - abs(ix), h - abs(iy)) < 16:
        return dx, dy, 0.0
    a = reference[max(0, iy):h + min(0, iy), max(0, ix):w + min(0, ix)]
    b = moving[max(0, -iy):h + min(0, -iy), max(0, -ix):w + min(0, -ix)]
    rx, ry, response = _phase_shift(a, b)
    return (ix + rx, iy + ry, response) if max(abs(rx), abs(ry)) <= MAX_RESIDUAL_PX else (dx, dy, 0.0)


def _verdict(params: RegisterParams, response: float, agreement: float, overlap: float, too_fast: bool) -> str:
    """Why a shift is not trusted, or "" when it is."""
    if response < params.min_response:
        return LOW_RESPONSE
    if overlap < params.min_overlap:
        return SMALL_OVERLAP
    if agreement < params.min_agreement:
        return DISAGREE
    return TOO_FAST if too_fast else ""


def overlap_agreement(reference: np.ndarray, moving: np.ndarray, dx: int, dy: int) -> tuple[float, float]:
    """(correlation, overlap fraction) of the parts two frames share when `moving` is shifted by (dx, dy)."""
    h, w = reference.shape
    if abs(dx) >= w or abs(dy) >= h:
        return 0.0, 0.0
    a = reference[max(0, dy):h + min(0, dy), max(0, dx):w + min(0, dx)].astype(np.float32)
    b = moving[max(0, -dy):h + min(0, -dy), max(0, -dx):w + min(0, -dx)].astype(np.float32)
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return (float((a * b).sum()) / norm if norm > 0 else 0.0), a.size / float(h * w)
