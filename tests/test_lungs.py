import json

import numpy as np
import pytest

from conftest import CXR_DEV
from covidxray.model.lungs import (AREA_RANGE, CARD_NAME, WEIGHTS_NAME, LungField,
                                   LungModelError, LungSegmenter, heat_share, lung_field,
                                   read_pairs, split_groups, train_segmenter)


def two_lungs(size=64, left=(8, 28), right=(36, 56), rows=(10, 54)) -> np.ndarray:
    mask = np.zeros((size, size), np.float32)
    mask[rows[0]:rows[1], left[0]:left[1]] = 0.9
    mask[rows[0]:rows[1], right[0]:right[1]] = 0.9
    return mask


def test_lung_field_keeps_two_lungs_and_judges_them():
    probabilities = two_lungs()
    probabilities[2:4, 2:4] = 0.9  # a speck beside the lungs: not a third lung
    field = lung_field(probabilities)
    assert field.plausible and field.reason == ""
    assert not field.mask[2:4, 2:4].any() and field.mask[20, 15] and field.mask[20, 45]
    one_side = lung_field(two_lungs(right=(36, 36)))
    assert not one_side.plausible and "one lung field only" in one_side.reason
    # an off-centre film: both lungs left of the image's midline, still side by side
    assert lung_field(two_lungs(left=(2, 14), right=(17, 30))).plausible
    stacked = np.zeros((64, 64), np.float32)  # one above the other, as no frontal film has them
    stacked[4:30, 20:34], stacked[34:62, 22:36] = 0.9, 0.9
    assert "not side by side" in lung_field(stacked).reason
    uneven = two_lungs()
    uneven[30:54, 36:56] = 0  # the right lung's top half only, 20 rows lower
    uneven[10:30, 36:56] = 0
    uneven[30:54, 36:56] = 0.9
    assert "tops of the two lung regions" in lung_field(uneven).reason
    wide = np.zeros((64, 64), np.float32)
    wide[20:40, 2:30], wide[20:40, 34:62] = 0.9, 0.9  # wider than high: a CT slice's lungs
    assert "as high as wide" in lung_field(wide).reason
    unsure = two_lungs()
    unsure[unsure == 0] = 0.45  # the network cannot tell anywhere else
    assert "unsure" in lung_field(unsure).reason
    nothing = lung_field(np.zeros((64, 64), np.float32))
    assert not nothing.plausible and "area 0%" in nothing.reason
    everything = lung_field(np.ones((64, 64), np.float32))
    assert not everything.plausible and everything.area > AREA_RANGE[1]


def test_box_margin_mask_and_heat_share():
    field = LungField(two_lungs() >= 0.5, 0.0, True, "")
    rows, cols = field.box((640, 320), margin=0.0)  # the mask covers rows 10..54, cols 8..56
    assert (rows.start, rows.stop) == (100, 540) and (cols.start, cols.stop) == (40, 280)
    wider_rows, wider_cols = field.box((640, 320), margin=0.1)
    assert wider_rows.start < 100 and wider_rows.stop > 540 and wider_cols.start < 40
    assert field.mask_at((128, 128)).shape == (128, 128) and field.mask_at((128, 128))[40, 30]
    outline = field.outline((128, 128))
    assert outline.any() and not outline[40, 30]  # the edge, not the inside
    heat = np.zeros((32, 32))
    heat[10, 7] = 1.0  # inside the left lung
    assert heat_share(heat, field) == 1.0
    heat[1, 1] = 1.0  # and as much outside
    assert heat_share(heat, field) == pytest.approx(0.5)
    assert heat_share(np.zeros((8, 8)), field) == 0.0


def test_pairs_are_split_by_patient(tmp_path):
    from covidxray.data.synthetic import make_synthetic_lung_masks
    folder = make_synthetic_lung_masks(tmp_path / "masks", n=12, size=32)
    pairs = read_pairs(folder)
    assert len(pairs) == 12 and all(p.group.startswith("patient:") for p in pairs)
    split = split_groups(pairs + [pairs[0]], seed=3)  # the same patient twice: one split
    assert set(split.values()) == {"train", "val", "test"} and len(split) == 12
    with pytest.raises(ValueError, match="no image/mask pairs"):
        read_pairs(tmp_path)


@pytest.mark.slow
def test_train_save_load_and_hash_check(tmp_path):
    from covidxray.data.synthetic import make_synthetic_lung_masks
    folder = make_synthetic_lung_masks(tmp_path / "synthetic", n=24, size=64, seed=1)
    card = train_segmenter([folder], tmp_path / "seg", image_size=32, base_filters=4, depth=2,
                           epochs=2, batch_size=8, verbose=0)
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
    from covidxray.pixels.imageio import read_image
    segmenter = LungSegmenter.load()
    normals = sorted((CXR_DEV / "NORMAL").glob("*.png"))[:12]  # normals: not in lung-masks
    fields = segmenter.fields([read_image(p) for p in normals])
    assert sum(f.plausible for f in fields) >= 11


def test_the_segmenter_runs_on_onnxruntime_with_the_keras_models_output(tmp_path, monkeypatch):
    """Where onnxruntime is installed the segmenter is exported once into Keras' cache and run
    there (it is about seven times as fast); its probabilities are the Keras model's."""
    import sys
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    fast = LungSegmenter.load()
    if fast.onnx_file is None:
        pytest.skip("the ONNX exporter (the [export] extra) is not installed")
    assert fast.onnx_file.parent == tmp_path / "models" and fast.weights_file is not None
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
