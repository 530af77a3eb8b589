"""Keras model -> SavedModel -> full-integer int8 TFLite, calibrated on real training crops."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from hematovision.errors import ModelInvalid
from hematovision.pixels import model_input

logger = logging.getLogger(__name__)


def convert_int8(model, calibration_crops: np.ndarray, per_channel: bool = True) -> bytes:
    """A full-integer TFLite model: uint8 pixel input, int8 logits output, int8 builtins only.

    `calibration_crops` are (N, S, S, 3) RGB crops in the pixels the device feeds (0..255);
    the model normalizes inside, so they are not normalized here. Keras 3 models convert through
    an exported SavedModel (converting the Keras object directly is not supported for Keras 3).
    Raises ModelInvalid when the converter fails.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative(calibration_crops)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.int8
        converter._experimental_disable_per_channel = not per_channel
        try:
            return converter.convert()
        except Exception as err:  # the converter raises many unrelated types
            raise ModelInvalid(f"int8 conversion failed: {err}") from err


def _representative(crops: np.ndarray):
    def generate():
        for crop in crops:
            yield [model_input(crop)]

    return generate


def non_int8_ops(tflite_model: bytes) -> list[str]:
    """Names of ops whose tensors are float: an empty list means a full-integer model."""
    from hematovision.edge.vision.model_bundle import find_interpreter_class

    interp = find_interpreter_class()(model_content=tflite_model)
    interp.allocate_tensors()
    floats = []
    for op in interp._get_ops_details():
        for index in list(op["inputs"]) + list(op["outputs"]):
            if index >= 0 and interp._get_tensor_details(index, subgraph_index=0)["dtype"] == np.float32:
                floats.append(op["op_name"])
                break
    return floats
