"""The one preprocessing step (``pixels.preprocess``): a decoded image to the model's input."""

import numpy as np
import pytest
from PIL import Image

from covidxray.pixels.decode import read_image
from covidxray.pixels.preprocess import load_for_model, prepare
from test_decode import gradient


def test_prepare_is_the_one_path(tmp_path):
    pixels = (gradient(80, 60) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_for_model(tmp_path / "a.png", 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, prepare(read_image(tmp_path / "a.png"), 32))
    assert out[:, 0].mean() < 20 and out[:, -1].mean() > 235


def test_fill_outside_lungs_leaves_the_lungs_alone():
    """``Preprocessing.fill="outside-lungs"``: everything but the lungs (grown a little) is the
    film's mean grey level, so text at the border says nothing; the lungs keep their pixels;
    a film without plausible lungs keeps everything."""
    from conftest import FixedLungs
    from covidxray.config import Preprocessing
    rng = np.random.default_rng(3)
    gray = rng.uniform(0.2, 0.8, (128, 128)).astype(np.float32)
    gray[2:10, 2:40] = 1.0  # a label in the corner
    spec = Preprocessing(64, fill="outside-lungs")
    lungs = FixedLungs([(0.25, 0.75, 0.15, 0.45), (0.25, 0.75, 0.55, 0.85)], size=64)
    filled = prepare(gray, spec, lungs.field(gray))
    plain = prepare(gray, Preprocessing(64))
    assert len(np.unique(filled[:8, :])) == 1  # the label is gone: one grey level up there
    assert np.array_equal(filled[24:40, 14:26], plain[24:40, 14:26])  # inside a lung
    assert abs(int(filled[0, 0]) - plain.mean()) <= 2
    unsure = FixedLungs([(0.25, 0.75, 0.15, 0.45)], plausible=False, size=64)
    assert np.array_equal(prepare(gray, spec, unsure.field(gray)), plain)
    with pytest.raises(ValueError, match="lung field is needed"):
        prepare(gray, spec)
    assert spec.uses_lungs and not Preprocessing(64).uses_lungs
