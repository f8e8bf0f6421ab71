import json

import numpy as np
import pytest

from conftest import CXR_DEV
from covidxray.model.lungs import CARD_NAME, WEIGHTS_NAME, LungModelError, LungSegmenter
from covidxray.training.lungs import train_segmenter


@pytest.mark.slow
def test_train_save_load_and_hash_check(tmp_path):
    from covidxray.data.synthetic import make_synthetic_lung_masks
    folder = make_synthetic_lung_masks(tmp_path / "synthetic", n=24, size=64, seed=1)
    from covidxray.config import LungTrainConfig
    card = train_segmenter([folder], tmp_path / "seg", LungTrainConfig(
        image_size=32, base_filters=4, depth=2, epochs=2, batch_size=8), verbose=0)
    assert card.heldout["synthetic"]["pairs"] >= 2
    assert 0 <= card.heldout["synthetic"]["dice_median"] <= 1
    assert card.data[0]["pairs"] == 24 and card.not_shown and card.sha256
    segmenter = LungSegmenter.load(tmp_path / "seg")
    fields = segmenter.fields([np.random.default_rng(0).random((50, 40), np.float32)] * 2)
    assert len(fields) == 2 and fields[0].mask.shape == (32, 32)
    saved = json.loads((tmp_path / "seg" / CARD_NAME).read_text())
    assert saved["sha256"] == card.sha256
    weights = tmp_path / "seg" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one damaged byte
    weights.write_bytes(bytes(data))
    with pytest.raises(LungModelError, match="damaged or replaced"):
        LungSegmenter.load(tmp_path / "seg")
    with pytest.raises(LungModelError, match="no lung segmenter"):
        LungSegmenter.load(tmp_path)


def test_shipped_segmenter_loads_with_its_card():
    segmenter = LungSegmenter.load()
    card = segmenter.card
    assert card.sha256 and card.heldout and card.not_shown and card.licence
    assert all(scores["dice_median"] >= 0.93 for scores in card.heldout.values())


@pytest.mark.skipif(not CXR_DEV.is_dir(), reason="../shared/data/cxr-dev is absent")
def test_shipped_segmenter_finds_lungs_on_films_it_never_saw():
    from covidxray.pixels.decode import read_image
    segmenter = LungSegmenter.load()
    normals = sorted((CXR_DEV / "NORMAL").glob("*.png"))[:12]  # normals: not in lung-masks
    fields = segmenter.fields([read_image(p) for p in normals])
    assert sum(f.plausible for f in fields) >= 11


def test_the_segmenter_runs_on_onnxruntime_with_the_keras_models_output(tmp_path, monkeypatch):
    """Where onnxruntime is installed the segmenter is exported once into covidxray's cache
    folder and run there (it is about seven times as fast); its probabilities are the Keras
    model's."""
    import sys
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("COVIDXRAY_CACHE", str(tmp_path))
    fast = LungSegmenter.load()
    if fast.onnx_file is None:
        pytest.skip("the ONNX exporter (the [export] extra) is not installed")
    assert fast.onnx_file.parent == tmp_path / "onnx" and fast.weights_file is not None
    with monkeypatch.context() as patched:  # exported once: later loads build no network
        patched.setattr("covidxray.model.lungs.build_unet", None)
        assert LungSegmenter.load().onnx_file == fast.onnx_file
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    plain = LungSegmenter.load()
    assert plain.onnx_file is None
    images = np.random.default_rng(0).integers(0, 255, (2, 128, 128)).astype(np.uint8)
    assert np.allclose(fast.probabilities(images), plain.probabilities(images), atol=1e-5)
    fast.export_onnx(tmp_path / "out" / "lungs.onnx")  # an export copies the cached file
    assert (tmp_path / "out" / "lungs.onnx").read_bytes() == fast.onnx_file.read_bytes()
