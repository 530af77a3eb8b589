"""Pixel conventions: images are RGB uint8 everywhere; models take 0..255 RGB floats."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .errors import ImageUnreadable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# What every model in this project expects at its input. Scaling and normalization for a
# particular backbone are layers inside the model, so the device never normalizes anything.
PREPROCESSING = {"color_order": "RGB", "dtype": "float32", "range": [0.0, 255.0], "normalization": "inside-model"}


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as an HxWx3 RGB uint8 array.

    Raises ImageUnreadable naming the file when it is missing, truncated or not an image.
    Grayscale images are expanded to three channels; an alpha channel is dropped.
    """
    path = Path(path)
    data = np.fromfile(path, dtype=np.uint8) if path.is_file() else None
    if data is None:
        raise ImageUnreadable(f"{path}: no such file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise ImageUnreadable(f"{path}: not a readable image (truncated or not an image file)")
    return to_rgb_uint8(image, already_rgb=False, name=str(path))


def to_rgb_uint8(image: np.ndarray, already_rgb: bool = True, name: str = "image") -> np.ndarray:
    """Bring a decoded image to HxWx3 RGB uint8 (OpenCV decodes BGR: pass already_rgb=False).

    Raises ImageUnreadable for a bit depth or channel count this project cannot use.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ImageUnreadable(f"{name}: unsupported pixel type {image.dtype}; save it as 8-bit RGB")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ImageUnreadable(f"{name}: unsupported shape {image.shape}; save it as 8-bit RGB")
    image = image[:, :, :3]
    return np.ascontiguousarray(image if already_rgb else image[:, :, ::-1])


def model_input(crops: np.ndarray) -> np.ndarray:
    """The one pixel preprocessing: RGB uint8 crops (N,S,S,3) to the float32 0..255 model input."""
    crops = np.asarray(crops)
    if crops.ndim == 3:
        crops = crops[None]
    return crops.astype(np.float32)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
