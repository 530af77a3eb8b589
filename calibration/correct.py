"""The per-frame correction the device applies: flat field, white balance, exposure, colour."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hematovision.errors import DataError

from .colour import reinhard_transfer
from .flatfield import upsample_gain
from .profile import BlankCalibration, CalibrationProfile, check_image_size


@lru_cache(maxsize=4)
def blank_gain_map(blank: BlankCalibration, height: int, width: int) -> np.ndarray:
    """Full-resolution H x W x 3 float32 factors: flat field x white balance x white_target / level."""
    factors = np.asarray(blank.white_balance, np.float32) * np.float32(blank.white_target / blank.level)
    full = upsample_gain(blank.gain_array(), height, width) * factors
    full.setflags(write=False)
    return full


def apply_blank(image: np.ndarray, blank: BlankCalibration) -> np.ndarray:
    """Flat-field, white-balance and exposure-normalize an RGB uint8 image (a blank becomes uniform grey)."""
    gain = blank_gain_map(blank, image.shape[0], image.shape[1])
    return np.clip(image.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def correct_illumination(image: np.ndarray, profile: CalibrationProfile) -> np.ndarray:
    """Flat field, white balance and exposure only: what the segmenter sees.

    Raises DataError / ConfigError as `correct` does.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DataError(f"correct needs an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    check_image_size(profile, image.shape)
    return image if profile.blank is None else apply_blank(image, profile.blank)


def correct_colour(image: np.ndarray, profile: CalibrationProfile) -> np.ndarray:
    """The stain-colour mapping toward the training data: what the classifier sees.

    A fixed per-pixel transform, so applying it to a cell crop equals cropping the mapped frame.
    """
    if profile.colour is None:
        return image
    return reinhard_transfer(image, profile.colour.source, profile.colour.target)


def correct(image: np.ndarray, profile: CalibrationProfile) -> np.ndarray:
    """The one correction of a camera frame: flat field, white balance and exposure, then colour.

    Takes and returns an HxWx3 RGB uint8 image; steps the profile has not calibrated are skipped.
    The full-resolution gain map is computed once per profile and cached.
    Raises DataError for an image that is not HxWx3 uint8 and ConfigError for an image whose
    size is not the one the profile was made for.
    """
    return correct_colour(correct_illumination(image, profile), profile)
