import socket
import time

import keras
import numpy as np
import pytest

from covidxray.model.backbones import get_backbone
from covidxray.model.network import BackboneInput, backbone_of, build_model, unfreeze_top_stages
from covidxray.model.weights import WeightsUnavailableError, resolve_weights


def test_model_outputs_one_probability_per_image():
    model = build_model(32, weights="none")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1)).astype("float32")
    out = keras.ops.convert_to_numpy(model(images, training=False))
    assert out.shape == (3, 1) and np.all((out >= 0) & (out <= 1))
    assert not backbone_of(model).trainable


@pytest.mark.parametrize("mode,expected", [("caffe", [100 - 103.939, 100 - 116.779, 100 - 123.68]),
                                           ("tf", [100 / 127.5 - 1] * 3),
                                           ("torch", list((100 / 255 - np.array([0.485, 0.456, 0.406]))
                                                          / np.array([0.229, 0.224, 0.225])))])
def test_backbone_input_replicates_gray_with_weights_preprocessing(mode, expected):
    out = keras.ops.convert_to_numpy(BackboneInput(mode)(np.full((1, 2, 2, 1), 100.0, "float32")))
    assert out.shape == (1, 2, 2, 3)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-5)


def test_unfreeze_top_stage_keeps_batchnorm_frozen():
    model = build_model(32, weights="none")
    unfreeze_top_stages(model, "resnet50", 1)
    trainable = {layer.name for layer in backbone_of(model).layers if layer.trainable
                 and layer.weights}
    assert trainable and all(name.startswith("conv5_") for name in trainable)
    assert not any(name.endswith("_bn") for name in trainable)


@pytest.mark.parametrize("name", ["densenet121", "efficientnetb0", "mobilenetv3small",
                                  "mobilenetv3large"])
def test_smaller_backbones_build_and_unfreeze_by_stage(name):
    model = build_model(32, backbone=name, weights="none")
    assert model.output_shape == (None, 1)
    scores = model.predict(np.full((2, 32, 32, 1), 128, np.uint8), verbose=0)
    assert np.all((scores >= 0) & (scores <= 1))
    base = backbone_of(model)
    with_weights = [layer for layer in base.layers if layer.weights]
    unfreeze_top_stages(model, name, 1, freeze_batchnorm=False)
    top = {layer.name for layer in with_weights if layer.trainable}
    assert top and len(top) < len(with_weights) / 2  # the top stage: some layers, not most
    unfreeze_top_stages(model, name, 2, freeze_batchnorm=False)
    assert {layer.name for layer in with_weights if layer.trainable} > top
    unfreeze_top_stages(model, name, "all", freeze_batchnorm=False)
    assert all(layer.trainable for layer in with_weights)  # the stem too


def test_local_weights_file_is_loaded(tmp_path):
    source = build_model(32, weights="none")
    path = tmp_path / "backbone.weights.h5"
    backbone_of(source).save_weights(path)
    loaded = build_model(32, weights=str(path))
    for a, b in zip(backbone_of(source).get_weights(), backbone_of(loaded).get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightsUnavailableError, match="not found"):
        resolve_weights(str(tmp_path / "missing.h5"), get_backbone("resnet50"))


def test_offline_imagenet_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # nothing cached here

    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(32, weights="imagenet")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "--weights PATH" in message and str(tmp_path) in message
    # a user without those weights is sent to the recipe whose weights are installed
    from covidxray.model.weights import OFFLINE_BACKBONE, offline_weights
    if offline_weights(get_backbone(OFFLINE_BACKBONE)):
        assert f"--backbone {OFFLINE_BACKBONE}" in message and "installed here" in message
    else:
        assert "covidxray[pretrained]" in message


def test_cached_imagenet_file_needs_no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    spec = get_backbone("resnet50")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / spec.weights_file).write_bytes(b"")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network used"))
    assert resolve_weights("imagenet", spec) == "imagenet"
    assert resolve_weights("none", spec) is None


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        get_backbone("vgg1")
