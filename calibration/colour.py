"""Stain colour: Lab statistics of smears and the Reinhard transfer toward the training data's."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

from hematovision.errors import CalibrationError, ConfigError

logger = logging.getLogger(__name__)

# Pixels sampled per image for the statistics (every n-th pixel in both directions).
_SAMPLE_STRIDE = 2
# A channel spread below this (Lab units) cannot be rescaled meaningfully.
_MIN_STD = 0.5
# Pixels a frame's colour summary samples (evenly strided): within 0.2 Lab units of stain_stats' every
# second pixel on the BCCD fields, at about 0.15 ms for a 640x480 frame.
SUMMARY_PIXELS = 5000
# The six numbers of a colour summary, in order: what a bundle's stain_range lists as its "keys".
SUMMARY_KEYS = ("L_mean", "a_mean", "b_mean", "L_std", "a_std", "b_std")


@dataclass(frozen=True)
class StainStats:
    """Mean and standard deviation of L*, a*, b* (CIE Lab, L 0..100) over a set of smear images."""

    lab_mean: tuple[float, float, float]
    lab_std: tuple[float, float, float]
    images: int

    def to_dict(self) -> dict:
        return {"lab_mean": list(self.lab_mean), "lab_std": list(self.lab_std), "images": self.images}

    @classmethod
    def from_dict(cls, d: dict, where: str = "stain statistics") -> "StainStats":
        """Raises ConfigError naming `where` and the key for a missing or out-of-range value."""
        try:
            mean = tuple(float(v) for v in d["lab_mean"])
            std = tuple(float(v) for v in d["lab_std"])
            images = int(d.get("images", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{where}: needs lab_mean and lab_std, three numbers each ({err!r})") from err
        if len(mean) != 3 or len(std) != 3 or not all(np.isfinite(mean + std)):
            raise ConfigError(f"{where}: lab_mean and lab_std must be three finite numbers each")
        if min(std) < _MIN_STD:
            raise ConfigError(f"{where}: lab_std {list(std)} has a channel below {_MIN_STD}; recompute it from real smears")
        return cls(lab_mean=mean, lab_std=std, images=images)


def rgb_to_lab(image: np.ndarray) -> np.ndarray:
    """RGB uint8 image to float32 Lab (L 0..100, a and b about -128..127), without 8-bit rounding."""
    return cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """float32 Lab back to an RGB uint8 image, clipping what falls outside the gamut."""
    rgb = cv2.cvtColor(lab.astype(np.float32), cv2.COLOR_Lab2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def colour_sample(image: np.ndarray, pixels: int = SUMMARY_PIXELS) -> np.ndarray:
    """About `pixels` pixels of an RGB image taken at an even stride (at least every second pixel,
    as stain_stats samples), as a small contiguous image."""
    stride = max(_SAMPLE_STRIDE, int(np.sqrt(image.shape[0] * image.shape[1] / pixels)))
    return np.ascontiguousarray(image[::stride, ::stride])


def lab_summary(image: np.ndarray) -> tuple[float, ...]:
    """The Lab mean and standard deviation of every pixel of an RGB uint8 image (SUMMARY_KEYS)."""
    mean, std = cv2.meanStdDev(cv2.cvtColor(image.astype(np.float32) * np.float32(1 / 255), cv2.COLOR_RGB2Lab))
    return tuple(float(v) for v in (*mean.ravel(), *std.ravel()))


def colour_summary(image: np.ndarray) -> tuple[float, ...]:
    """One image's colour summary (SUMMARY_KEYS): what stain_stats([image]) gives, at a fraction of its cost."""
    return lab_summary(colour_sample(image))


def stain_stats(images: Iterable[np.ndarray]) -> StainStats:
    """Pooled Lab mean and standard deviation over all pixels of RGB uint8 smear images.

    Raises CalibrationError when no image is given or the pooled colour has no spread (a blank
    or uniform image: the statistics of a stain need a stained smear).
    """
    total, total_sq, count, n_images = np.zeros(3), np.zeros(3), 0, 0
    for image in images:
        lab = rgb_to_lab(image[::_SAMPLE_STRIDE, ::_SAMPLE_STRIDE]).reshape(-1, 3).astype(np.float64)
        total += lab.sum(0)
        total_sq += (lab**2).sum(0)
        count += lab.shape[0]
        n_images += 1
    if n_images == 0:
        raise CalibrationError("stain statistics need at least one smear image")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    if std.min() < _MIN_STD:
        raise CalibrationError(
            f"the smear images have almost no colour spread (Lab std {std.round(2).tolist()}); "
            "use images of a stained smear with cells in the field"
        )
    return StainStats(tuple(mean.tolist()), tuple(std.tolist()), n_images)


def reinhard_transfer(image: np.ndarray, source: StainStats, target: StainStats) -> np.ndarray:
    """Map an RGB uint8 image from the `source` stain statistics to the `target` ones (Reinhard).

    Each Lab channel is shifted and scaled: (x - source mean) / source std * target std + target
    mean. The same fixed transform is applied to every frame of this microscope.
    """
    lab = rgb_to_lab(image)
    scale = np.asarray(target.lab_std, np.float32) / np.asarray(source.lab_std, np.float32)
    lab = (lab - np.asarray(source.lab_mean, np.float32)) * scale + np.asarray(target.lab_mean, np.float32)
    return lab_to_rgb(lab)


def stats_distance(a: StainStats, b: StainStats) -> float:
    """Distance between two sets of stain statistics: Euclidean over the Lab means and stds."""
    mean = np.subtract(a.lab_mean, b.lab_mean)
    std = np.subtract(a.lab_std, b.lab_std)
    return float(np.sqrt((mean**2).sum() + (std**2).sum()))
