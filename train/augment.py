"""Training augmentation: any rotation, zoom, flips, and colour / stain jitter across labs."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from hematovision.crop import CropJitter

# Haematoxylin, eosin and residual stain vectors in optical density (Ruifrok & Johnston),
# the usual basis for stain augmentation (Tellez et al. 2018).
_STAIN_RGB = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_STAIN_RGB = _STAIN_RGB / np.linalg.norm(_STAIN_RGB, axis=1, keepdims=True)
_STAIN_INV = np.linalg.inv(_STAIN_RGB)


@dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random changes; zero everywhere means no augmentation."""

    zoom: float = 0.10  # +-10 % scale
    shift_um: float = 1.0  # cell centre moved up to this far
    stain_scale: float = 0.15  # each stain's concentration x (1 +- this)
    stain_shift: float = 0.05  # ... + (+- this) optical density
    brightness: float = 0.12  # x (1 +- this)
    contrast: float = 0.15
    hue_deg: float = 8.0
    saturation: float = 0.15
    blur_prob: float = 0.2  # slight defocus now and then
    blur_max_px: float = 1.2  # ... of up to this Gaussian sigma, in crop pixels
    sharpen_prob: float = 0.0  # unsharp masking now and then (a sharper camera than the training lab's)
    jpeg_prob: float = 0.0  # JPEG compression now and then, at quality 40..90 (a cheaper camera)
    noise_sd: float = 0.0  # sensor noise: Gaussian, up to this standard deviation in 8-bit levels


NO_AUGMENT = AugmentParams(0, 0, 0, 0, 0, 0, 0, 0, 0)
# Rotation, zoom, flips and shift only: the colours stay as photographed.
GEOMETRIC = AugmentParams(stain_scale=0, stain_shift=0, brightness=0, contrast=0, hue_deg=0,
                          saturation=0, blur_prob=0)
# Geometry plus mild stain and exposure changes, no hue turn: the device maps each crop's colours
# to the training stain statistics first, so only the differences left after that are simulated.
MILD_STAIN = AugmentParams(stain_scale=0.08, stain_shift=0.02, brightness=0.08, contrast=0.08, hue_deg=0.0,
                           saturation=0.08, blur_prob=0.2)
# Another laboratory: stronger stain, hue and exposure changes, wider zoom (pixel-size estimates
# differ by about 10% between labs), defocus and sharpening, JPEG and sensor noise. For models that
# must hold on microscopes they were not trained on.
CROSS_LAB = AugmentParams(zoom=0.2, stain_scale=0.3, stain_shift=0.06, brightness=0.15, contrast=0.25,
                          hue_deg=12.0, saturation=0.3, blur_prob=0.3, blur_max_px=2.0, sharpen_prob=0.2,
                          jpeg_prob=0.3, noise_sd=4.0)
AUGMENT_MODES = {"full": AugmentParams(), "stain": MILD_STAIN, "geometric": GEOMETRIC, "crosslab": CROSS_LAB,
                 "none": None}


def random_jitter(rng: np.random.Generator, params: AugmentParams) -> CropJitter:
    """Rotation at any angle (cells have no orientation), zoom, mirror and a small shift."""
    if params == NO_AUGMENT:
        return CropJitter()
    return CropJitter(
        angle_deg=float(rng.uniform(0, 360)),
        zoom=float(np.exp(rng.uniform(-params.zoom, params.zoom))),
        flip=bool(rng.integers(2)),
        shift_um=tuple(float(v) for v in rng.uniform(-params.shift_um, params.shift_um, 2)),
    )


def jitter_colour(crop: np.ndarray, rng: np.random.Generator, params: AugmentParams) -> np.ndarray:
    """Stain, brightness, contrast, hue and saturation changes of an RGB uint8 crop."""
    if params in (NO_AUGMENT, GEOMETRIC):
        return crop
    out = _stain_jitter(crop, rng, params)
    out = _hsv_jitter(out, rng, params)
    out = _brightness_contrast(out, rng, params)
    return _camera(out, rng, params)


def _camera(crop: np.ndarray, rng, params: AugmentParams) -> np.ndarray:
    """Optics and sensor: defocus or sharpening, noise, JPEG compression."""
    if rng.random() < params.blur_prob:
        crop = cv2.GaussianBlur(crop, (0, 0), float(rng.uniform(0.5, max(params.blur_max_px, 0.5))))
    elif params.sharpen_prob and rng.random() < params.sharpen_prob:
        amount = float(rng.uniform(0.3, 1.0))
        crop = cv2.addWeighted(crop, 1.0 + amount, cv2.GaussianBlur(crop, (0, 0), 1.5), -amount, 0)
    if params.noise_sd > 0:
        noise = rng.normal(0.0, float(rng.uniform(0, params.noise_sd)), crop.shape)
        crop = np.clip(crop + noise, 0, 255).astype(np.uint8)
    if params.jpeg_prob and rng.random() < params.jpeg_prob:
        ok, data = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 91))])
        crop = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    return crop


def _stain_jitter(crop: np.ndarray, rng, params: AugmentParams) -> np.ndarray:
    od = -np.log((crop.astype(np.float32) + 1.0) / 256.0)
    conc = od.reshape(-1, 3) @ _STAIN_INV
    alpha = rng.uniform(1 - params.stain_scale, 1 + params.stain_scale, 3)
    beta = rng.uniform(-params.stain_shift, params.stain_shift, 3)
    od = (conc * alpha + beta) @ _STAIN_RGB
    rgb = 256.0 * np.exp(-od) - 1.0
    return np.clip(rgb, 0, 255).reshape(crop.shape).astype(np.uint8)


def _hsv_jitter(crop: np.ndarray, rng, params: AugmentParams) -> np.ndarray:
    hsv = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV_FULL).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-params.hue_deg, params.hue_deg) * 256 / 360) % 256
    hsv[..., 1] *= rng.uniform(1 - params.saturation, 1 + params.saturation)
    hsv = np.clip(hsv, 0, 255).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _brightness_contrast(crop: np.ndarray, rng, params: AugmentParams) -> np.ndarray:
    img = crop.astype(np.float32)
    mean = img.mean()
    img = (img - mean) * rng.uniform(1 - params.contrast, 1 + params.contrast) + mean
    img *= rng.uniform(1 - params.brightness, 1 + params.brightness)
    return np.clip(img, 0, 255).astype(np.uint8)
