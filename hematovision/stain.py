"""Colour and sharpness standardisation of cell crops: the one function training and the device both apply."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .errors import DataError, ModelInvalid

METHODS = ("none", "reinhard")
# A channel spread below this (8-bit Lab units) is not rescaled: a uniform crop has no stain to match.
_MIN_STD_8BIT = 2.0


@dataclass(frozen=True)
class ColourStandard:
    """How a crop's colours are standardised before the model sees it.

    "reinhard": each crop's CIE Lab channels are shifted and scaled to `target_mean` / `target_std`
    (L 0..100, a and b about -128..127), so the model meets one colour distribution whatever the
    lab's stain and camera white balance. "none": the crop as cut. `blur_px` (model-input pixels,
    0 for none) then softens every crop by a Gaussian of that sigma, so a sharp camera's fine
    texture does not look like granules to a model trained on a softer one.
    """

    method: str = "none"
    target_mean: tuple[float, float, float] = (72.0, 9.0, 2.0)
    target_std: tuple[float, float, float] = (12.0, 10.0, 13.0)
    blur_px: float = 0.0

    def validate(self, where: str = "colour standard") -> "ColourStandard":
        """Raises ModelInvalid naming `where` for an unknown method or a non-positive spread."""
        if self.method not in METHODS:
            raise ModelInvalid(f"{where}: colour method {self.method!r} is unknown; use one of {', '.join(METHODS)}")
        if len(self.target_mean) != 3 or len(self.target_std) != 3 or min(self.target_std) <= 0 \
                or not np.all(np.isfinite(self.target_mean + self.target_std)):
            raise ModelInvalid(f"{where}: target_mean and target_std must be three finite numbers, spreads > 0")
        if not 0 <= self.blur_px <= 5:
            raise ModelInvalid(f"{where}: blur_px {self.blur_px} is out of range (0 to 5 pixels)")
        return self

    def to_dict(self) -> dict:
        return {"method": self.method, "target_mean": list(self.target_mean), "target_std": list(self.target_std),
                "blur_px": self.blur_px}

    @classmethod
    def from_dict(cls, d: dict | None, where: str = "colour standard") -> "ColourStandard":
        """None (a bundle made before standardisation existed) means "none". Raises ModelInvalid."""
        if d is None:
            return NO_STANDARD
        try:
            return cls(str(d["method"]), tuple(float(v) for v in d["target_mean"]),
                       tuple(float(v) for v in d["target_std"]), float(d.get("blur_px", 0.0))).validate(where)
        except (KeyError, TypeError, ValueError) as err:
            raise ModelInvalid(f"{where}: needs method, target_mean and target_std ({err!r}); re-export the bundle") from err


NO_STANDARD = ColourStandard()
REINHARD = ColourStandard("reinhard")
# The standards a training run can name (`hematovision-train fit --colour`).
STANDARDS = {"none": NO_STANDARD, "reinhard": REINHARD, "reinhard+blur": ColourStandard("reinhard", blur_px=1.5)}


def standardise_crops(crops: np.ndarray, standard: ColourStandard) -> np.ndarray:
    """(N, S, S, 3) or (S, S, 3) RGB uint8 crops with their colours standardised; same shape and type.

    Raises DataError for crops that are not RGB uint8.
    """
    crops = np.asarray(crops)
    if crops.dtype != np.uint8 or crops.shape[-1] != 3 or crops.ndim not in (3, 4):
        raise DataError(f"colour standardisation needs RGB uint8 crops, got {crops.shape} {crops.dtype}")
    if standard == NO_STANDARD:
        return crops
    if crops.ndim == 3:
        return _standardise(crops, standard)
    return np.stack([_standardise(c, standard) for c in crops]) if len(crops) else crops


def _standardise(crop: np.ndarray, standard: ColourStandard) -> np.ndarray:
    out = _reinhard(crop, standard) if standard.method == "reinhard" else crop
    return cv2.GaussianBlur(out, (0, 0), standard.blur_px) if standard.blur_px > 0 else out


def _target_8bit(standard: ColourStandard) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's 8-bit Lab: L scaled to 0..255, a and b offset by 128."""
    scale = np.array([255.0 / 100.0, 1.0, 1.0])
    return np.array(standard.target_mean) * scale + [0.0, 128.0, 128.0], np.array(standard.target_std) * scale


def _reinhard(crop: np.ndarray, standard: ColourStandard) -> np.ndarray:
    lab = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2Lab)
    mean, std = (v.ravel() for v in cv2.meanStdDev(lab[::2, ::2]))
    std = np.maximum(std, _MIN_STD_8BIT)
    t_mean, t_std = _target_8bit(standard)
    levels = np.arange(256, dtype=np.float32)[:, None]
    table = np.clip((levels - mean) * (t_std / std) + t_mean + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.LUT(lab, table[:, None, :]), cv2.COLOR_Lab2RGB)
