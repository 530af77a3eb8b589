"""The device's model loader: verify a bundle, create the int8 interpreter once, run crops through it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.crop import CropGeometry
from hematovision.errors import DataError, ModelInvalid
from hematovision.head import Head
from hematovision.novelty import NoveltyModel
from hematovision.stain import NO_STANDARD, ColourStandard

from .bundle_meta import BUNDLE_FORMAT, BundleMeta, StainRange, check_meta, verify_stamp  # noqa: F401 - BUNDLE_FORMAT for export

logger = logging.getLogger(__name__)

MODEL_FILE = "model.tflite"
META_FILE = "bundle.json"
MAX_META_BYTES = 16 * 2**20  # a bundle.json is tens of kilobytes


@dataclass(frozen=True)
class Quantization:
    """Affine int8 / uint8 parameters of a tensor: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int
    dtype: str

    @property
    def is_identity_uint8(self) -> bool:
        """uint8 with scale 1 and zero point 0: 0..255 pixels are their own quantized values."""
        return self.dtype == "uint8" and self.scale == 1.0 and self.zero_point == 0

    def quantize(self, x: np.ndarray) -> np.ndarray:
        if self.is_identity_uint8 and np.asarray(x).dtype == np.uint8:
            return np.ascontiguousarray(x)
        info = np.iinfo(self.dtype)
        q = np.round(np.asarray(x, np.float32) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return (q.astype(np.float32) - self.zero_point) * self.scale


def find_interpreter_class():
    """LiteRT first, then tflite-runtime, then TensorFlow's own (desktop only).

    Raises ModelInvalid saying what to install when none is there.
    """
    for module, attr in (("ai_edge_litert.interpreter", "Interpreter"),
                         ("tflite_runtime.interpreter", "Interpreter"),
                         ("tensorflow", "lite")):
        try:
            found = __import__(module, fromlist=[attr])
        except ImportError:
            continue
        logger.debug("TFLite runtime: %s", module)
        return found.lite.Interpreter if attr == "lite" else getattr(found, attr)
    raise ModelInvalid("no TFLite runtime found: pip install ai-edge-litert (or tflite-runtime)")


class Int8Model:
    """One interpreter for a full-integer model: pixels in (0..255), dequantized logits out, and,
    when the model has a second output, its whitened features for the novelty score (the output
    with more values than there are classes)."""

    def __init__(self, model_content: bytes, threads: int | None = None, name: str = MODEL_FILE):
        interpreter_class = find_interpreter_class()
        try:
            self._interp = interpreter_class(model_content=model_content, num_threads=threads or os.cpu_count())
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelInvalid(f"{name}: not a loadable TFLite model ({err}); re-export the bundle") from err
        self._in = self._interp.get_input_details()[0]
        outputs = sorted(self._interp.get_output_details(), key=lambda d: int(d["shape"][-1]))
        if len(outputs) > 2:
            raise ModelInvalid(f"{name}: {len(outputs)} outputs; a bundle model has logits and, optionally, "
                               "features; re-export the bundle")
        self._out, self._features = outputs[0], (outputs[1] if len(outputs) == 2 else None)
        self.input_q = _quantization(self._in, name)
        self.output_q = _quantization(self._out, name)
        self.features_q = _quantization(self._features, name) if self._features is not None else None
        self.input_size = int(self._in["shape"][1])
        self.n_outputs = int(self._out["shape"][-1])
        self.n_features = int(self._features["shape"][-1]) if self._features is not None else 0
        self._batch = int(self._in["shape"][0])

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB crops -> (N, K) float logits, batched in one invocation."""
        return self.run(crops)[0]

    def run(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, S, S, 3) uint8 RGB crops -> (N, K) logits and (N, D) features (None without a second
        output), batched in one invocation. Raises DataError for crops of the wrong size."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise DataError(f"crops must be {self.input_size}x{self.input_size}x3, got {crops.shape[1:]}")
        if len(crops) == 0:
            features = np.zeros((0, self.n_features), np.float32) if self.n_features else None
            return np.zeros((0, self.n_outputs), np.float32), features
        self._resize(len(crops))
        self._interp.set_tensor(self._in["index"], self.input_q.quantize(crops))
        self._interp.invoke()
        logits = self.output_q.dequantize(self._interp.get_tensor(self._out["index"]))
        if self._features is None:
            return logits, None
        return logits, self.features_q.dequantize(self._interp.get_tensor(self._features["index"]))

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self._interp.resize_tensor_input(self._in["index"], [n, self.input_size, self.input_size, 3])
            self._interp.allocate_tensors()
            self._batch = n


def _quantization(detail: dict, name: str) -> Quantization:
    scale, zero = detail["quantization"]
    dtype = np.dtype(detail["dtype"]).name
    if dtype not in ("int8", "uint8") or not scale:
        raise ModelInvalid(f"{name}: tensor {detail['name']} is {dtype}, not quantized int8/uint8; "
                           "export it with hematovision-export")
    return Quantization(float(scale), int(zero), dtype)


@dataclass(frozen=True)
class Bundle:
    """A verified model bundle, ready to classify crops."""

    path: Path
    meta: dict
    classes: tuple[str, ...]
    geometry: CropGeometry
    temperature: float
    threshold: float
    model: Int8Model
    colour: ColourStandard = NO_STANDARD  # applied to every crop before the model
    novelty: NoveltyModel | None = None  # a cell whose features score above its threshold is "unidentified"
    trained_um_per_pixel: float | None = None
    stain_range: tuple[StainRange, ...] = ()  # each training lab's colour, for the specimen checks
    head: Head | None = None  # an adapted bundle's head: its logits replace the model's own

    def logits(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, S, S, 3) standardised uint8 crops -> logits (the head's, in an adapted bundle) and features."""
        logits, features = self.model.run(crops)
        return (self.head.logits(features), features) if self.head is not None else (logits, features)

    @property
    def um_per_pixel(self) -> float | None:
        return self.trained_um_per_pixel


def load_bundle(path: str | Path, threads: int | None = None, stamp: bool = True) -> Bundle:
    """Load and verify a bundle folder (bundle.json + model.tflite, and novelty.npz when bundle.json
    names it).

    Raises ModelInvalid naming the file, the field and the fix: a missing or malformed
    bundle.json, a stamp (meta_sha256) that does not match its content (`stamp=False` skips
    that check, for re-stamping only), any field missing or out of range, an unknown format
    version, a model or arrays sha256 mismatch, a corrupt model, or shapes / classes that disagree.
    """
    path = Path(path)
    meta = read_meta(path / META_FILE)
    if stamp:
        verify_stamp(meta, str(path / META_FILE))
    checked = check_meta(meta, str(path / META_FILE))
    content = read_hashed(path / MODEL_FILE, checked.model_sha256)
    model = Int8Model(content, threads, str(path / MODEL_FILE))
    _check_shapes(path, checked, model)
    return Bundle(path, meta, checked.classes, checked.geometry, checked.temperature, checked.threshold, model,
                  checked.colour, _novelty(path, checked, model), checked.trained_um_per_pixel,
                  checked.stain_range, _head(path, checked, model))


def _head(path: Path, meta: BundleMeta, model: Int8Model) -> Head | None:
    if meta.head is None:
        return None
    if meta.head.features != model.n_features:
        raise ModelInvalid(f"{path / META_FILE}: head.features {meta.head.features} disagrees with the "
                           f"{model.n_features} features {MODEL_FILE} gives; adapt the bundle again")
    data = read_hashed(path / meta.head.file, meta.head.sha256)
    return Head.from_bytes(data, model.n_features, meta.classes, str(path / meta.head.file))


def _novelty(path: Path, meta: BundleMeta, model: Int8Model) -> NoveltyModel | None:
    entry = meta.novelty
    if entry is None:
        return None
    data = read_hashed(path / entry.file, entry.sha256)
    novelty = NoveltyModel.from_arrays(data, entry.threshold, model.n_features, str(path / entry.file))
    if novelty.dims != entry.dims:
        raise ModelInvalid(f"{path / META_FILE}: novelty.dims {entry.dims} disagrees with {entry.file}'s "
                           f"{novelty.dims}; re-export the bundle")
    return novelty


def read_meta(path: Path) -> dict:
    """bundle.json as a JSON object. Raises ModelInvalid when it is missing, unreadable or not JSON."""
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise ModelInvalid(f"{path}: larger than {MAX_META_BYTES // 2**20} MB, not a bundle description; "
                               "re-export the bundle")
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise ModelInvalid(f"{path}: missing; a bundle is a folder with {META_FILE} and {MODEL_FILE}") from err
    except OSError as err:
        raise ModelInvalid(f"{path}: cannot be read ({err.strerror}); check its permissions") from err
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ModelInvalid(f"{path}: not valid JSON ({err}); re-export the bundle") from err
    if not isinstance(meta, dict):
        raise ModelInvalid(f"{path}: is not a JSON object; re-export the bundle")
    return meta


def read_hashed(path: Path, expected_sha256: str) -> bytes:
    """A bundle file's bytes; raises ModelInvalid naming the file and the fix when it is missing,
    unreadable or not the file bundle.json hashed."""
    try:
        content = path.read_bytes()
    except FileNotFoundError as err:
        raise ModelInvalid(f"{path}: missing; copy the whole bundle folder") from err
    except OSError as err:
        raise ModelInvalid(f"{path}: cannot be read ({err.strerror}); check its permissions") from err
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ModelInvalid(f"{path}: sha256 {actual[:12]}... does not match bundle.json "
                           f"({str(expected_sha256)[:12]}...): the file is corrupt or was replaced; copy the bundle again")
    return content


def _check_features(where: Path, meta: BundleMeta, model: Int8Model) -> None:
    features = meta.novelty.features if meta.novelty is not None else 0
    if features != model.n_features:
        raise ModelInvalid(f"{where}: novelty.features {features} disagrees with the {model.n_features} "
                           f"features {MODEL_FILE} gives; re-export the bundle")


def _check_shapes(path: Path, meta: BundleMeta, model: Int8Model) -> None:
    where = path / META_FILE
    if meta.head is None and model.n_outputs != len(meta.classes):
        raise ModelInvalid(f"{where}: lists {len(meta.classes)} classes but {MODEL_FILE} has {model.n_outputs} "
                           "outputs; re-export the bundle")
    if model.input_size != meta.input_size:
        raise ModelInvalid(f"{where}: input.size {meta.input_size} disagrees with {MODEL_FILE}'s "
                           f"{model.input_size}; re-export the bundle")
    _check_features(where, meta, model)
    for name, stored, actual in (("input", meta.input_quantization, model.input_q),
                                 ("output", meta.output_quantization, model.output_q),
                                 ("features", meta.features_quantization, model.features_q)):
        if stored is None:
            continue
        if abs(stored.scale - actual.scale) > 1e-6 * max(1.0, stored.scale) or stored.zero_point != actual.zero_point \
                or stored.dtype != actual.dtype:
            raise ModelInvalid(f"{where}: quantization.{name} {stored} disagrees with {MODEL_FILE}'s "
                               f"{actual}; re-export the bundle")
