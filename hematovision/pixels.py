"""Pixel conventions: images are RGB uint8 everywhere; models take 0..255 RGB floats."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np

from .errors import ConfigError, ImageTooLarge, ImageUnreadable
from .image_size import header_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

# What every model in this project expects at its input. Scaling and normalization for a
# particular backbone are layers inside the model, so the device never normalizes anything.
PREPROCESSING = {"color_order": "RGB", "dtype": "float32", "range": [0.0, 255.0], "normalization": "inside-model"}

# The largest image read, in pixels: a 24-megapixel camera frame. A 400-megapixel PNG of a few
# hundred kilobytes would otherwise take gigabytes once decoded.
DEFAULT_MAX_PIXELS = 24_000_000
MAX_PIXELS_ENV = "HEMATOVISION_MAX_PIXELS"
_MAX_BYTES_PER_PIXEL = 8  # 16-bit RGBA, uncompressed: no image within the limit has a larger file


def default_max_pixels() -> int:
    """$HEMATOVISION_MAX_PIXELS, else DEFAULT_MAX_PIXELS. Raises ConfigError for a value that is
    not a whole number above 0."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{MAX_PIXELS_ENV}={text!r} is not a whole number above 0; set it to a pixel "
                          f"count such as {DEFAULT_MAX_PIXELS} or unset it")
    return value


def check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    """Raises ImageTooLarge naming `name` when width x height exceeds `max_pixels`."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
                            f"{max_pixels / 1e6:g}; use a smaller image, or raise the limit (--max-pixels, "
                            f"source.max_pixels in the daemon's configuration, or ${MAX_PIXELS_ENV})")


def read_rgb(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read an image file as an HxWx3 RGB uint8 array; the one reader of image files.

    Raises ImageUnreadable naming the file and the fix when it is missing, a folder, not
    readable by this user, truncated or not an image; ImageTooLarge when it has more than
    `max_pixels` pixels (default `default_max_pixels()`), refused from its header before
    decoding for PNG, JPEG, BMP, TIFF and WebP. Grayscale images are expanded to three
    channels; an alpha channel is dropped.
    """
    path = Path(path)
    limit = max_pixels or default_max_pixels()
    data = _read_file(path, limit)
    size = header_size(data)
    if size is not None:
        check_pixels(*size, limit, str(path))
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise ImageUnreadable(f"{path}: not a readable image (truncated or not an image file); "
                              "give a .jpg, .png, .bmp or .tif image")
    check_pixels(image.shape[1], image.shape[0], limit, str(path))
    return to_rgb_uint8(image, already_rgb=False, name=str(path))


def _read_file(path: Path, max_pixels: int) -> bytes:
    """The bytes of a plain file no larger than an image of `max_pixels` can be."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise ImageUnreadable(f"{path}: is a folder, not an image file; give the image files in it")
        if not stat.S_ISREG(info.st_mode):
            raise ImageUnreadable(f"{path}: not a plain file (a device or a pipe); give an image file")
        if info.st_size > max_pixels * _MAX_BYTES_PER_PIXEL + 2**20:
            raise ImageTooLarge(f"{path}: {info.st_size / 1e6:.0f} MB is larger than any image within the limit "
                                f"of {max_pixels / 1e6:g} megapixels; use a smaller image or raise the limit")
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as err:
        raise ImageUnreadable(f"{path}: no such file; check the path") from err
    except PermissionError as err:
        raise ImageUnreadable(f"{path}: permission denied; make the file readable by this user "
                              "(chmod a+r) or run as its owner") from err
    except OSError as err:
        raise ImageUnreadable(f"{path}: cannot be read ({err.strerror}); check the file and its disk") from err


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
    """Image files directly in `folder`, sorted by name. Raises ImageUnreadable when it cannot be listed."""
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as err:
        raise ImageUnreadable(f"{folder}: cannot list the folder ({err.strerror}); check its permissions") from err
