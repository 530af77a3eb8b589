"""bundle.json checked field by field, and its stamp: a sha256 over every other key, set at export."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from hematovision.calibration.colour import SUMMARY_KEYS
from hematovision.classes import validate_class_list
from hematovision.crop import CropGeometry
from hematovision.errors import DataError, ModelInvalid
from hematovision.head import HEAD_FILE
from hematovision.head import METHOD as HEAD_METHOD
from hematovision.novelty import ARRAYS_FILE
from hematovision.novelty import METHOD as NOVELTY_METHOD
from hematovision.pixels import PREPROCESSING
from hematovision.stain import ColourStandard

BUNDLE_FORMAT = "hematovision.bundle/1"
STAMP_KEY = "meta_sha256"
QUANTIZED_DTYPES = {"uint8": (0, 255), "int8": (-128, 127)}
RESTAMP = "hematovision-export --restamp BUNDLE"
REEXPORT = "re-export the bundle (hematovision-export RUN --out BUNDLE)"


@dataclass(frozen=True)
class TensorQuantization:
    """What bundle.json says of a tensor's quantization (checked against the model on load)."""

    scale: float
    zero_point: int
    dtype: str


@dataclass(frozen=True)
class NoveltyEntry:
    """What bundle.json says of the novelty model: its threshold, and the arrays file with its hash."""

    threshold: float
    features: int
    dims: int
    file: str
    sha256: str


@dataclass(frozen=True)
class HeadEntry:
    """What bundle.json says of a site's re-fitted classifier head (an adapted bundle): its file and hash;
    its classes are the bundle's."""

    file: str
    sha256: str
    features: int


@dataclass(frozen=True)
class StainRange:
    """One training lab's colour: the mean and standard deviation, over its training images, of each
    image's colour summary (calibration.colour.SUMMARY_KEYS: Lab means and spreads)."""

    lab: str
    images: int
    mean: tuple[float, ...]
    sd: tuple[float, ...]


@dataclass(frozen=True)
class BundleMeta:
    """The fields of bundle.json the device uses, each checked."""

    classes: tuple[str, ...]
    input_size: int
    geometry: CropGeometry
    trained_um_per_pixel: float | None
    input_quantization: TensorQuantization
    output_quantization: TensorQuantization
    temperature: float
    threshold: float
    colour: ColourStandard
    model_sha256: str
    novelty: NoveltyEntry | None = None  # none in bundles made before novelty scores existed
    features_quantization: TensorQuantization | None = None
    stain_range: tuple[StainRange, ...] = ()  # none in bundles made before stain ranges existed
    head: HeadEntry | None = None  # an adapted bundle's head over the features, instead of the model's logits


def meta_digest(meta: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of every key but the stamp."""
    body = {k: v for k, v in meta.items() if k != STAMP_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def stamped(meta: dict) -> dict:
    """`meta` with its stamp (last, after every other key)."""
    return {**{k: v for k, v in meta.items() if k != STAMP_KEY}, STAMP_KEY: meta_digest(meta)}


def verify_stamp(meta: dict, where: str) -> None:
    """Raises ModelInvalid when the stamp is missing or bundle.json changed after it was set."""
    stamp = meta.get(STAMP_KEY)
    if stamp is None:
        raise ModelInvalid(f"{where}: has no {STAMP_KEY} (exported before bundles were stamped, or written by "
                           f"hand); {REEXPORT}, or check every field and run {RESTAMP}")
    if stamp != meta_digest(meta):
        raise ModelInvalid(f"{where}: {STAMP_KEY} does not match its content: the file was edited or damaged "
                           f"after export (a changed class order would relabel every cell); copy the bundle "
                           f"again or {REEXPORT}; if the edit was deliberate and checked, run {RESTAMP}")


def check_meta(meta: object, where: str) -> BundleMeta:
    """Every field of bundle.json the device uses, checked. Raises ModelInvalid naming the field."""
    if not isinstance(meta, dict):
        raise ModelInvalid(f"{where}: is not a JSON object; {REEXPORT}")
    fmt = _field(meta, "format", where)
    if fmt != BUNDLE_FORMAT:
        raise ModelInvalid(f"{where}: format {fmt!r}, this device reads {BUNDLE_FORMAT!r}; "
                           "export the model again with this version of hematovision")
    if _field(meta, "preprocessing", where) != PREPROCESSING:
        raise ModelInvalid(f"{where}: preprocessing {meta['preprocessing']!r} is not this project's {PREPROCESSING!r}; "
                           f"{REEXPORT}")
    classes = _classes(meta, where)
    for key in ("name", "project_version"):  # named in every report
        if not isinstance(meta.get(key, ""), str) or len(meta.get(key, "")) > 200:
            raise ModelInvalid(f"{where}: {key} must be text of at most 200 characters; {REEXPORT}")
    size = _integer(meta, "input.size", where, 8, 4096)
    _choice(meta, "input.dtype", where, tuple(QUANTIZED_DTYPES))
    _choice(meta, "input.color_order", where, ("RGB",))
    geometry = CropGeometry(_number(meta, "crop_geometry.side_um", where, 0.0, 1000.0, low_open=True),
                            _integer(meta, "crop_geometry.input_size", where, size, size))
    trained_um = _field(meta, "crop_geometry.trained_um_per_pixel", where, optional=True)
    if trained_um is not None:
        trained_um = _number(meta, "crop_geometry.trained_um_per_pixel", where, 0.0, 100.0, low_open=True)
    return BundleMeta(
        classes, size, geometry, trained_um, _quantization(meta, "input", where), _quantization(meta, "output", where),
        _number(meta, "confidence.temperature", where, 0.0, 100.0, low_open=True),
        _number(meta, "confidence.threshold", where, 0.0, 1.0),
        _colour(meta, where), _hex64(meta, "model_sha256", where), *_novelty(meta, where), _stain_range(meta, where),
        _head(meta, where))


def _head(meta: dict, where: str) -> HeadEntry | None:
    """An adapted bundle's head: needs the novelty entry's feature output, and lists the bundle's classes."""
    if _field(meta, "head", where, optional=True) is None:
        return None
    _choice(meta, "head.method", where, (HEAD_METHOD,))
    if _field(meta, "novelty", where, optional=True) is None:
        raise ModelInvalid(f"{where}: head needs the model's feature output, and this bundle has no novelty entry; "
                           "adapt the bundle again")
    if _field(meta, "head.classes", where) != meta["classes"]:
        raise ModelInvalid(f"{where}: head.classes disagree with classes; adapt the bundle again")
    return HeadEntry(_choice(meta, "head.file", where, (HEAD_FILE,)), _hex64(meta, "head.sha256", where),
                     _integer(meta, "head.features", where, 1, 100_000))


def _novelty(meta: dict, where: str) -> tuple[NoveltyEntry | None, TensorQuantization | None]:
    """The novelty entry and the feature output's quantization, both or neither."""
    if _field(meta, "novelty", where, optional=True) is None:
        return None, None
    _choice(meta, "novelty.method", where, (NOVELTY_METHOD,))
    file = _choice(meta, "novelty.file", where, (ARRAYS_FILE,))
    entry = NoveltyEntry(_number(meta, "novelty.threshold", where, 0.0, 1e6, low_open=True),
                         _integer(meta, "novelty.features", where, 1, 100_000),
                         _integer(meta, "novelty.dims", where, 1, 100_000), file,
                         _hex64(meta, "novelty.sha256", where))
    return entry, _quantization(meta, "features", where)


def _stain_range(meta: dict, where: str) -> tuple[StainRange, ...]:
    """Each training lab's colour range; empty when the bundle has none (made before it existed)."""
    labs = _field(meta, "stain_range", where, optional=True)
    if labs is None:
        return ()
    if not isinstance(labs, dict) or not labs or not all(isinstance(lab, str) and lab for lab in labs):
        raise ModelInvalid(f"{where}: stain_range must be a JSON object of training labs; {REEXPORT}")
    out = []
    for lab in sorted(labs):
        key = f"stain_range.{lab}"
        if _field(meta, f"{key}.keys", where) != list(SUMMARY_KEYS):
            raise ModelInvalid(f"{where}: {key}.keys must be {list(SUMMARY_KEYS)}; {REEXPORT}")
        out.append(StainRange(lab, _integer(meta, f"{key}.images", where, 1, 10**9),
                              _numbers(meta, f"{key}.mean", where, -200.0), _numbers(meta, f"{key}.sd", where, 0.0)))
    return tuple(out)


def _numbers(meta: dict, dotted: str, where: str, low: float) -> tuple[float, ...]:
    """One finite number from `low` to 200 per colour summary key."""
    value = _field(meta, dotted, where)
    ok = isinstance(value, list) and len(value) == len(SUMMARY_KEYS) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= 200.0
        for v in value)
    if not ok:
        raise ModelInvalid(f"{where}: {dotted} = {value!r:.80} must be {len(SUMMARY_KEYS)} numbers from {low:g} "
                           f"to 200; {REEXPORT}")
    return tuple(float(v) for v in value)


def _field(meta: dict, dotted: str, where: str, optional: bool = False):
    """The value at a dotted path; raises ModelInvalid naming the path when a part is missing."""
    value = meta
    for depth, part in enumerate(dotted.split(".")):
        if not isinstance(value, dict):
            parent = ".".join(dotted.split(".")[:depth])
            raise ModelInvalid(f"{where}: {parent} must be a JSON object with {part!r}, got {value!r:.60}; {REEXPORT}")
        if part not in value:
            if optional:
                return None
            raise ModelInvalid(f"{where}: {dotted} is missing; {REEXPORT}")
        value = value[part]
    return value


def _number(meta: dict, dotted: str, where: str, low: float, high: float, low_open: bool = False) -> float:
    value = _field(meta, dotted, where)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        span = f"{'above' if low_open else 'from'} {low:g} {'and at most' if low_open else 'to'} {high:g}"
        raise ModelInvalid(f"{where}: {dotted} = {value!r:.60} must be a number {span}; {REEXPORT}")
    return float(value)


def _integer(meta: dict, dotted: str, where: str, low: int, high: int) -> int:
    value = _field(meta, dotted, where)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        wanted = f"{low}" if low == high else f"a whole number from {low} to {high}"
        raise ModelInvalid(f"{where}: {dotted} = {value!r:.60} must be {wanted}; {REEXPORT}")
    return value


def _choice(meta: dict, dotted: str, where: str, choices: tuple[str, ...]) -> str:
    value = _field(meta, dotted, where)
    if value not in choices:
        raise ModelInvalid(f"{where}: {dotted} = {value!r:.60} must be one of {', '.join(choices)}; {REEXPORT}")
    return value


def _classes(meta: dict, where: str) -> tuple[str, ...]:
    value = _field(meta, "classes", where)
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ModelInvalid(f"{where}: classes must be a list of class names, got {value!r:.60}; {REEXPORT}")
    try:
        classes = validate_class_list(value, f"{where}: classes")
    except DataError as err:
        raise ModelInvalid(f"{err}; {REEXPORT}") from err
    listed = _measured_classes(meta)
    if listed is not None and listed != value:
        raise ModelInvalid(f"{where}: classes {value} are not in the order the model was measured in "
                           f"(metrics.float.classes {listed}): every cell would get another class's name; {REEXPORT}")
    return classes


def _measured_classes(meta: dict) -> list | None:
    """The class order of the held-out metrics (informational, so only when it is well formed)."""
    metrics = meta.get("metrics")
    measured = metrics.get("float") if isinstance(metrics, dict) else None
    listed = measured.get("classes") if isinstance(measured, dict) else None
    return listed if isinstance(listed, list) else None


def _quantization(meta: dict, tensor: str, where: str) -> TensorQuantization:
    key = f"quantization.{tensor}"
    dtype = _choice(meta, f"{key}.dtype", where, tuple(QUANTIZED_DTYPES))
    scale = _number(meta, f"{key}.scale", where, 0.0, 1e6, low_open=True)
    return TensorQuantization(scale, _integer(meta, f"{key}.zero_point", where, *QUANTIZED_DTYPES[dtype]), dtype)


def _colour(meta: dict, where: str) -> ColourStandard:
    """The crops' colour standardisation; none when the bundle has no "colour" (made before it existed)."""
    try:
        return ColourStandard.from_dict(_field(meta, "colour", where, optional=True), f"{where}: colour")
    except ModelInvalid as err:
        raise ModelInvalid(str(err) if "re-export" in str(err) else f"{err}; {REEXPORT}") from err


def _hex64(meta: dict, dotted: str, where: str) -> str:
    value = _field(meta, dotted, where)
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ModelInvalid(f"{where}: {dotted} = {value!r:.70} must be 64 lower-case hex digits; {REEXPORT}")
    return value
