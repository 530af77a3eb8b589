"""The device's model loader: verify a bundle, create the int8 interpreter once, run crops through it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hematovision.classes import validate_class_list
from hematovision.crop import CropGeometry
from hematovision.errors import DataError, ModelInvalid
from hematovision.stain import NO_STANDARD, ColourStandard

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "hematovision.bundle/1"
MODEL_FILE = "model.tflite"
META_FILE = "bundle.json"
_REQUIRED = ("format", "classes", "input", "crop_geometry", "quantization", "confidence", "model_sha256")


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
    """One interpreter for a full-integer model: pixels in (0..255), dequantized logits out."""

    def __init__(self, model_content: bytes, threads: int | None = None, name: str = MODEL_FILE):
        interpreter_class = find_interpreter_class()
        try:
            self._interp = interpreter_class(model_content=model_content, num_threads=threads or os.cpu_count())
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelInvalid(f"{name}: not a loadable TFLite model ({err}); re-export the bundle") from err
        self._in = self._interp.get_input_details()[0]
        self._out = self._interp.get_output_details()[0]
        self.input_q = _quantization(self._in, name)
        self.output_q = _quantization(self._out, name)
        self.input_size = int(self._in["shape"][1])
        self.n_outputs = int(self._out["shape"][-1])
        self._batch = int(self._in["shape"][0])

    def logits(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB crops -> (N, K) float logits, batched in one invocation."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise DataError(f"crops must be {self.input_size}x{self.input_size}x3, got {crops.shape[1:]}")
        if len(crops) == 0:
            return np.zeros((0, self.n_outputs), np.float32)
        self._resize(len(crops))
        self._interp.set_tensor(self._in["index"], self.input_q.quantize(crops))
        self._interp.invoke()
        return self.output_q.dequantize(self._interp.get_tensor(self._out["index"]))

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

    @property
    def um_per_pixel(self) -> float | None:
        return self.meta["crop_geometry"].get("trained_um_per_pixel")


def load_bundle(path: str | Path, threads: int | None = None) -> Bundle:
    """Load and verify a bundle folder (bundle.json + model.tflite).

    Raises ModelInvalid naming the file and what is wrong: missing or malformed bundle.json, an
    unknown format version, a sha256 mismatch, a corrupt model, or shapes / classes that disagree.
    """
    path = Path(path)
    meta = _read_meta(path / META_FILE)
    content = _read_model(path / MODEL_FILE, meta["model_sha256"])
    classes = validate_class_list(meta["classes"], str(path / META_FILE))
    model = Int8Model(content, threads, str(path / MODEL_FILE))
    geometry = CropGeometry.from_dict(meta["crop_geometry"])
    _check_shapes(path, meta, model, classes, geometry)
    conf = meta["confidence"]
    colour = ColourStandard.from_dict(meta.get("colour"), str(path / META_FILE))
    return Bundle(path, meta, classes, geometry, float(conf["temperature"]), float(conf["threshold"]), model, colour)


def _read_meta(path: Path) -> dict:
    if not path.is_file():
        raise ModelInvalid(f"{path}: missing; a bundle is a folder with {META_FILE} and {MODEL_FILE}")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelInvalid(f"{path}: not valid JSON ({err}); re-export the bundle") from err
    missing = [k for k in _REQUIRED if k not in meta] if isinstance(meta, dict) else list(_REQUIRED)
    if missing:
        raise ModelInvalid(f"{path}: missing keys {missing}; re-export the bundle")
    if meta["format"] != BUNDLE_FORMAT:
        raise ModelInvalid(f"{path}: format {meta['format']!r}, this device reads {BUNDLE_FORMAT!r}; "
                           "export the model again with this version of hematovision")
    return meta


def _read_model(path: Path, expected_sha256: str) -> bytes:
    if not path.is_file():
        raise ModelInvalid(f"{path}: missing; copy the whole bundle folder")
    content = path.read_bytes()
    actual = hashlib.sha256(content).hexdigest()
    if actual != expected_sha256:
        raise ModelInvalid(f"{path}: sha256 {actual[:12]}... does not match bundle.json "
                           f"({str(expected_sha256)[:12]}...): the file is corrupt or was replaced; copy the bundle again")
    return content


def _check_shapes(path: Path, meta: dict, model: Int8Model, classes, geometry: CropGeometry) -> None:
    where = path / META_FILE
    if model.n_outputs != len(classes):
        raise ModelInvalid(f"{where}: lists {len(classes)} classes but {MODEL_FILE} has {model.n_outputs} outputs")
    if model.input_size != geometry.input_size or int(meta["input"]["size"]) != model.input_size:
        raise ModelInvalid(f"{where}: input size {meta['input']['size']} / crop {geometry.input_size} "
                           f"disagrees with {MODEL_FILE}'s {model.input_size}")
    stored = meta["quantization"]["input"]
    if abs(stored["scale"] - model.input_q.scale) > 1e-9 * max(1.0, stored["scale"]) \
            or stored["zero_point"] != model.input_q.zero_point:
        raise ModelInvalid(f"{where}: input quantization {stored} disagrees with {MODEL_FILE}")
