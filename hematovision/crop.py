"""Crop geometry: a square of fixed physical size around a cell, resampled to the model input."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import DataError


@dataclass(frozen=True)
class CropGeometry:
    """A cell crop: `side_um` micrometres square, resampled to `input_size` pixels square."""

    side_um: float = 24.0
    input_size: int = 224

    def side_px(self, um_per_pixel: float) -> float:
        """Side of the crop in pixels of an image with the given pixel size."""
        return self.side_um / um_per_pixel

    def to_dict(self) -> dict:
        return {"side_um": self.side_um, "input_size": self.input_size}

    @classmethod
    def from_dict(cls, d: dict) -> "CropGeometry":
        return cls(side_um=float(d["side_um"]), input_size=int(d["input_size"]))


DEFAULT_GEOMETRY = CropGeometry()


@dataclass(frozen=True)
class CropJitter:
    """Training-time changes of the crop: rotation, zoom, mirror and a shift of the centre."""

    angle_deg: float = 0.0
    zoom: float = 1.0
    flip: bool = False
    shift_um: tuple[float, float] = (0.0, 0.0)


NO_JITTER = CropJitter()


def crop_matrix(center_xy, um_per_pixel: float, geometry: CropGeometry, jitter: CropJitter) -> np.ndarray:
    """2x3 affine map from crop pixel (u, v) to image pixel (x, y)."""
    size = geometry.input_size
    scale = geometry.side_px(um_per_pixel) / (size * jitter.zoom)
    theta = math.radians(jitter.angle_deg)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    lin = rot * scale
    if jitter.flip:
        lin = lin @ np.array([[-1.0, 0.0], [0.0, 1.0]])
    cx = center_xy[0] + jitter.shift_um[0] / um_per_pixel
    cy = center_xy[1] + jitter.shift_um[1] / um_per_pixel
    half = (size - 1) / 2.0
    offset = np.array([cx, cy]) - lin @ np.array([half, half])
    return np.hstack([lin, offset[:, None]])


def cut_crop(
    image: np.ndarray,
    center_xy: tuple[float, float],
    um_per_pixel: float,
    geometry: CropGeometry = DEFAULT_GEOMETRY,
    jitter: CropJitter = NO_JITTER,
) -> np.ndarray:
    """Cut the cell crop centred on `center_xy` (image pixels) from an RGB uint8 image.

    The crop is `geometry.side_um` micrometres square whatever the magnification, so a model
    trained at one pixel size sees cells at the same size on any microscope. Parts of the square
    outside the image are filled by mirroring the image at its border.

    Raises DataError for an image that is not HxWx3 uint8 or a non-positive pixel size.
    """
    return cut_crops(image, [center_xy], um_per_pixel, geometry, jitter)[0]


def cut_crops(
    image: np.ndarray,
    centers_xy,
    um_per_pixel: float,
    geometry: CropGeometry = DEFAULT_GEOMETRY,
    jitter: CropJitter = NO_JITTER,
) -> np.ndarray:
    """The crops (`cut_crop`) around several centres of one image, stacked (N, S, S, 3).

    OpenCV warps four channels about twice as fast as three, with the same values per channel,
    so the image is converted to RGBA once and every crop is warped from that.
    Raises DataError as `cut_crop` does.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"cut_crop needs an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    if not um_per_pixel > 0:
        raise DataError(f"pixel size must be positive, got {um_per_pixel} um per pixel")
    size = geometry.input_size
    crops = np.zeros((len(centers_xy), size, size, 3), np.uint8)
    rgba = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA) if len(centers_xy) else image
    for i, center in enumerate(centers_xy):
        matrix = crop_matrix(center, um_per_pixel, geometry, jitter)
        downsampling = matrix[0, 0] ** 2 + matrix[1, 0] ** 2 > 4
        crop = _cut_downsampled(rgba, matrix, size) if downsampling else _warp(rgba, matrix, size)
        crops[i] = cv2.cvtColor(crop, cv2.COLOR_RGBA2RGB)
    return crops


def _warp(rgba: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Bilinear `size` x `size` warp by the crop-to-image `matrix`, mirrored at the border."""
    return cv2.warpAffine(rgba, matrix, (size, size),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REFLECT_101)


def _cut_downsampled(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Warp at an intermediate resolution, then area-average down, to avoid aliasing."""
    factor = int(math.ceil(math.hypot(matrix[0, 0], matrix[1, 0]) / 2))
    big = size * factor
    fine = matrix.copy()
    fine[:, :2] /= factor
    fine[:, 2] = matrix[:, 2] - fine[:, :2] @ np.array([(factor - 1) / 2.0] * 2)
    return cv2.resize(_warp(image, fine, big), (size, size), interpolation=cv2.INTER_AREA)
