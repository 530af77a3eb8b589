"""The calibration profile: a versioned JSON file the device loads, written atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hematovision.errors import ConfigError

from .colour import StainStats

logger = logging.getLogger(__name__)

PROFILE_FORMAT = "hematovision-calibration-profile"
PROFILE_VERSION = 1
STAGE_MICROMETER = "stage micrometer"
RED_CELL_ESTIMATE = "red-cell estimate"
PIXEL_SIZE_SOURCES = (STAGE_MICROMETER, RED_CELL_ESTIMATE)
_TOP_KEYS = {"format", "version", "image_size", "blank", "camera_controls", "pixel_size", "focus", "colour"}


@dataclass(frozen=True)
class BlankCalibration:
    """Flat field, white balance and exposure measured on blank fields.

    `gain` is the smooth low-resolution flat-field map, channel-major (R, G, B) x rows x columns,
    each channel with mean 1; its nodes sit on a grid whose corners are the image corners.
    Correcting multiplies by gain (interpolated), by `white_balance` and by white_target / level,
    so a blank field becomes uniform neutral grey at `white_target` of full scale.
    """

    gain: tuple[tuple[tuple[float, ...], ...], ...]
    white_balance: tuple[float, float, float]
    level: float
    white_target: float
    frames: int
    frame_spread: float

    def gain_array(self) -> np.ndarray:
        return np.asarray(self.gain, dtype=np.float32)


@dataclass(frozen=True)
class CameraControls:
    """Fixed picamera2 controls for counting: manual exposure, gain and colour gains."""

    exposure_time_us: int
    analogue_gain: float
    colour_gains: tuple[float, float]

    def to_picamera2(self) -> dict:
        """The controls dict for Picamera2.set_controls (auto-exposure and auto-white-balance off)."""
        return {
            "AeEnable": False, "AwbEnable": False, "ExposureTime": self.exposure_time_us,
            "AnalogueGain": self.analogue_gain, "ColourGains": tuple(self.colour_gains),
        }


@dataclass(frozen=True)
class PixelSize:
    """Micrometres per image pixel, its standard uncertainty, and how it was found."""

    um_per_pixel: float
    uncertainty: float
    source: str

    @property
    def is_estimate(self) -> bool:
        return self.source != STAGE_MICROMETER


@dataclass(frozen=True)
class FocusCalibration:
    """Frames whose focus_score is below `threshold` are dropped."""

    threshold: float
    best_score: float
    series_scores: tuple[float, ...]


@dataclass(frozen=True)
class ColourCalibration:
    """Reinhard Lab transfer from this microscope's stain statistics to the training data's."""

    source: StainStats
    target: StainStats


@dataclass(frozen=True)
class CalibrationProfile:
    """Everything the device needs to correct and check frames of one camera on one microscope."""

    image_size: tuple[int, int]
    blank: BlankCalibration | None = None
    camera_controls: CameraControls | None = None
    pixel_size: PixelSize | None = None
    focus: FocusCalibration | None = None
    colour: ColourCalibration | None = None
    version: int = PROFILE_VERSION

    def updated(self, **changes) -> "CalibrationProfile":
        return replace(self, **changes)


def check_image_size(profile: CalibrationProfile, shape: tuple[int, ...], name: str = "image") -> None:
    """Raises ConfigError when an image of `shape` (H, W, ...) is not the profile's camera size."""
    width, height = profile.image_size
    if tuple(shape[:2]) != (height, width):
        raise ConfigError(
            f"{name} is {shape[1]}x{shape[0]} pixels but the profile was made for {width}x{height} frames "
            "from this camera; capture at the profile's resolution, or make a new profile with "
            "'hematovision-calibrate blank ... --profile NEW_PROFILE'"
        )


def check_against_bundle(profile: CalibrationProfile, bundle_pixel_um: float, tolerance: float = 0.15) -> float:
    """Check the microscope's pixel size against the pixel size the model was trained at.

    Returns the relative difference. A model bundle sees cells at a fixed physical size, but a
    different objective changes resolution and depth of field, which no resize undoes.
    Raises ConfigError when the profile has no pixel size or it differs by more than
    `tolerance` (a fraction) from `bundle_pixel_um`.
    """
    if not bundle_pixel_um > 0 or not 0 < tolerance < 1:
        raise ConfigError(f"bundle pixel size {bundle_pixel_um} and tolerance {tolerance} must be positive")
    if profile.pixel_size is None:
        raise ConfigError(
            "the calibration profile has no pixel_size; run 'hematovision-calibrate micrometer' "
            "with a stage micrometer (or 'redcells' for an estimate) first"
        )
    measured = profile.pixel_size.um_per_pixel
    difference = abs(measured - bundle_pixel_um) / bundle_pixel_um
    if difference > tolerance:
        raise ConfigError(
            f"magnification mismatch: the microscope images {measured:.4f} um per pixel but the model was "
            f"trained at {bundle_pixel_um:.4f} um per pixel ({difference:.0%} apart, tolerance {tolerance:.0%}); "
            "use the objective and camera the model was trained for, or a model bundle trained at this magnification"
        )
    if profile.pixel_size.is_estimate:
        logger.warning("the profile's pixel size is a red-cell estimate; calibrate with a stage micrometer")
    return difference


def profile_to_dict(profile: CalibrationProfile) -> dict:
    """The JSON form of a profile (see load_profile for the keys)."""
    b, c, p, f, col = profile.blank, profile.camera_controls, profile.pixel_size, profile.focus, profile.colour
    return {
        "format": PROFILE_FORMAT,
        "version": profile.version,
        "image_size": {"width": profile.image_size[0], "height": profile.image_size[1]},
        "blank": None if b is None else {
            "flat_field_gain": [[list(row) for row in ch] for ch in b.gain],
            "white_balance_rgb": list(b.white_balance), "exposure_level": b.level,
            "white_target": b.white_target, "frames": b.frames, "frame_spread": b.frame_spread,
        },
        "camera_controls": None if c is None else {
            "ExposureTime": c.exposure_time_us, "AnalogueGain": c.analogue_gain,
            "ColourGains": list(c.colour_gains), "AeEnable": False, "AwbEnable": False,
        },
        "pixel_size": None if p is None else {
            "um_per_pixel": p.um_per_pixel, "uncertainty_um_per_pixel": p.uncertainty,
            "source": p.source, "estimate": p.is_estimate,
        },
        "focus": None if f is None else {
            "threshold": f.threshold, "best_score": f.best_score, "series_scores": list(f.series_scores),
        },
        "colour": None if col is None else {
            "method": "reinhard-lab", "source": col.source.to_dict(), "target": col.target.to_dict(),
        },
    }


def _get(d: dict, key: str, where: str, kind=float, positive: bool = True):
    if not isinstance(d, dict) or key not in d:
        raise ConfigError(f"{where}: missing key '{key}'; recreate the profile with hematovision-calibrate")
    try:
        value = kind(d[key])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}.{key}: {d[key]!r} is not a {kind.__name__}") from err
    if kind in (float, int) and (not math.isfinite(value) or (positive and value <= 0)):
        raise ConfigError(f"{where}.{key}: {value} is out of range (must be a finite positive number)")
    return value


def _blank_from(d: dict) -> BlankCalibration:
    gain = np.asarray(d.get("flat_field_gain") if isinstance(d, dict) else None, dtype=object)
    try:
        gain = np.asarray(gain.tolist(), dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError("blank.flat_field_gain: not a numeric 3 x rows x columns array") from err
    if gain.ndim != 3 or gain.shape[0] != 3 or min(gain.shape[1:]) < 2:
        raise ConfigError(f"blank.flat_field_gain: shape {gain.shape} is not 3 x rows x columns (at least 2x2)")
    if not np.all(np.isfinite(gain)) or gain.min() <= 0:
        raise ConfigError("blank.flat_field_gain: gains must be finite and positive; redo the blank calibration")
    wb = d.get("white_balance_rgb")
    if not isinstance(wb, list) or len(wb) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in wb):
        raise ConfigError(f"blank.white_balance_rgb: {wb!r} must be three positive numbers")
    return BlankCalibration(
        gain=tuple(tuple(tuple(row) for row in ch) for ch in gain.tolist()),
        white_balance=tuple(float(v) for v in wb),
        level=_get(d, "exposure_level", "blank"), white_target=_get(d, "white_target", "blank"),
        frames=_get(d, "frames", "blank", int), frame_spread=_get(d, "frame_spread", "blank", positive=False),
    )


def _controls_from(d: dict) -> CameraControls:
    gains = d.get("ColourGains") if isinstance(d, dict) else None
    if not isinstance(gains, list) or len(gains) != 2 or not all(isinstance(v, (int, float)) and v > 0 for v in gains):
        raise ConfigError(f"camera_controls.ColourGains: {gains!r} must be two positive numbers (red, blue)")
    return CameraControls(
        exposure_time_us=_get(d, "ExposureTime", "camera_controls", int),
        analogue_gain=_get(d, "AnalogueGain", "camera_controls"), colour_gains=(float(gains[0]), float(gains[1])),
    )


def _pixel_size_from(d: dict) -> PixelSize:
    source = d.get("source") if isinstance(d, dict) else None
    if source not in PIXEL_SIZE_SOURCES:
        raise ConfigError(f"pixel_size.source: {source!r} must be one of {list(PIXEL_SIZE_SOURCES)}")
    return PixelSize(
        um_per_pixel=_get(d, "um_per_pixel", "pixel_size"),
        uncertainty=_get(d, "uncertainty_um_per_pixel", "pixel_size", positive=False), source=source,
    )


def _focus_from(d: dict) -> FocusCalibration:
    scores = d.get("series_scores", []) if isinstance(d, dict) else None
    if not isinstance(scores, list):
        raise ConfigError("focus.series_scores: must be a list of numbers")
    return FocusCalibration(
        threshold=_get(d, "threshold", "focus"), best_score=_get(d, "best_score", "focus"),
        series_scores=tuple(float(s) for s in scores),
    )


def _colour_from(d: dict) -> ColourCalibration:
    if not isinstance(d, dict) or d.get("method") != "reinhard-lab":
        raise ConfigError("colour.method: only 'reinhard-lab' is known; recreate the colour calibration")
    return ColourCalibration(
        source=StainStats.from_dict(d.get("source", {}), "colour.source"),
        target=StainStats.from_dict(d.get("target", {}), "colour.target"),
    )


_SECTIONS = {
    "blank": _blank_from, "camera_controls": _controls_from, "pixel_size": _pixel_size_from,
    "focus": _focus_from, "colour": _colour_from,
}


def profile_from_dict(d: dict, where: str = "profile") -> CalibrationProfile:
    """Validate and build a profile from its JSON form.

    Raises ConfigError naming the key for an unknown key, a wrong version or an out-of-range value.
    """
    if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{where}: not a Hematovision calibration profile (key 'format' must be '{PROFILE_FORMAT}')")
    unknown = sorted(set(d) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed are {sorted(_TOP_KEYS)}")
    if d.get("version") != PROFILE_VERSION:
        raise ConfigError(
            f"{where}: key 'version' is {d.get('version')!r} but this software reads version {PROFILE_VERSION}; "
            "recreate the profile with this version of hematovision-calibrate"
        )
    size = d.get("image_size")
    width, height = _get(size, "width", "image_size", int), _get(size, "height", "image_size", int)
    sections = {}
    for key, build in _SECTIONS.items():
        try:
            sections[key] = None if d.get(key) is None else build(d[key])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from err
    return CalibrationProfile(image_size=(width, height), **sections)


def load_profile(path: str | Path) -> CalibrationProfile:
    """Read and validate a profile file.

    JSON keys: format, version, image_size{width,height}, blank{flat_field_gain, white_balance_rgb,
    exposure_level, white_target, frames, frame_spread}, camera_controls{ExposureTime, AnalogueGain,
    ColourGains, AeEnable, AwbEnable}, pixel_size{um_per_pixel, uncertainty_um_per_pixel, source,
    estimate}, focus{threshold, best_score, series_scores}, colour{method, source, target}; a
    section not yet calibrated is null.
    Raises ConfigError naming the file for a missing, unreadable or invalid profile.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: no such profile; create it with 'hematovision-calibrate blank ... --profile {path}'") from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: not readable as JSON ({err}); restore {previous_path(path)} or recalibrate") from err
    return profile_from_dict(data, where=str(path))


def previous_path(path: str | Path) -> Path:
    """Where save_profile keeps the profile it replaced."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def save_profile(profile: CalibrationProfile, path: str | Path) -> None:
    """Write a profile atomically; the profile it replaces is kept as PROFILE.prev.

    The new profile is validated, written to a temporary file in the same folder, fsynced and
    renamed over `path`, so `path` always holds a complete profile. Raises ConfigError (and
    leaves `path` untouched) when the profile does not validate.
    """
    path = Path(path)
    try:
        text = json.dumps(profile_to_dict(profile), indent=2, allow_nan=False)
    except ValueError as err:
        raise ConfigError(f"new profile for {path} holds a value that is not finite ({err}); nothing was written") from err
    profile_from_dict(json.loads(text), where="new profile")
    if path.exists():
        _write_atomic(previous_path(path), path.read_bytes())
    _write_atomic(path, text.encode("utf-8") + b"\n")
    logger.info("wrote calibration profile %s", path)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

