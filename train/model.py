"""The classifier: a pretrained backbone, global pooling, dropout and a logits layer."""

from __future__ import annotations

import logging

from .backbones import build_backbone

logger = logging.getLogger(__name__)


def build_classifier(backbone_name: str, weights, n_classes: int, input_size: int, dropout: float):
    """pixels (0..255 RGB) -> logits. The backbone is the layer named "backbone"."""
    import keras

    backbone = build_backbone(backbone_name, input_size, weights)
    backbone.name = "backbone"
    inputs = keras.Input((input_size, input_size, 3), name="pixels")
    x = backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(n_classes, name="logits")(x)
    return keras.Model(inputs, logits, name=f"hematovision_{backbone_name}")


def freeze_backbone(model) -> None:
    """Phase 1, feature extraction: only the head trains."""
    model.get_layer("backbone").trainable = False


def unfreeze_top(model, fraction: float) -> int:
    """Phase 2: the top `fraction` of the backbone's weighted layers train; BatchNorm stays frozen.

    Returns the number of layers unfrozen.
    """
    import keras

    backbone = model.get_layer("backbone")
    backbone.trainable = True
    layers = [layer for layer in _leaf_layers(backbone) if layer.weights]
    cut = int(round(len(layers) * (1.0 - fraction)))
    for i, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = i >= cut and not is_bn and layer.name != "caffe_preprocess"
    unfrozen = sum(layer.trainable for layer in layers)
    logger.info("fine-tuning %d of %d weighted backbone layers (BatchNorm frozen)", unfrozen, len(layers))
    return unfrozen


def _leaf_layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            yield from _leaf_layers(layer)
        else:
            yield layer
