"""The out-of-distribution gate on drawn radiograph-like images: what it lets through, what it
flags and why, and that a saved gate gives the same verdicts."""

import numpy as np
import pytest

from covidxray.data.synthetic import synthetic_radiograph
from covidxray.pixels.preprocess import prepare
from covidxray.run.ood import COLOUR_LIMIT, OODGate, nearest_distance, thumbnails

SIZE = 64


def radiographs(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([prepare(synthetic_radiograph(rng, 96, covid=bool(i % 2)), SIZE)
                     for i in range(n)])


def embeddings_like(images: np.ndarray) -> np.ndarray:
    """A stand-in for backbone features: a fixed random projection of the pixels."""
    projection = np.random.default_rng(99).normal(size=(SIZE * SIZE, 48))
    return images.reshape(len(images), -1).astype(np.float64) / 255.0 @ projection


@pytest.fixture(scope="module")
def gate():
    train, val = radiographs(0, 200), radiographs(1, 80)
    return OODGate.fit(embeddings_like(train), train, embeddings_like(val), val)


def test_thumbnails_ignore_exposure_and_contrast():
    image = radiographs(2, 1)
    brighter = np.clip(image.astype(float) * 0.5 + 60, 0, 255).astype(np.uint8)
    np.testing.assert_allclose(thumbnails(brighter), thumbnails(image), atol=0.05)
    assert thumbnails(np.full((1, SIZE, SIZE), 77, np.uint8)).any() == False  # noqa: E712


def test_nearest_distance_matches_brute_force():
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(30, 5)), rng.normal(size=(4, 5))
    brute = np.sort(np.linalg.norm(queries[:, None] - reference[None], axis=2), axis=1)[:, :3]
    np.testing.assert_allclose(nearest_distance(reference, queries, 3), brute.mean(1))


def test_held_out_radiographs_pass(gate):
    held_out = radiographs(3, 100)
    flags = [v.ood for v in gate.check(embeddings_like(held_out), held_out)]
    assert np.mean(flags) <= 0.05


def test_unlike_images_are_flagged_with_a_reason(gate):
    rng = np.random.default_rng(4)
    y, x = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    ct_slice = np.where((x / 0.9) ** 2 + (y / 0.6) ** 2 <= 1, 0.6, 0.0)  # body on black
    ct_slice[((np.abs(x) - 0.4) / 0.28) ** 2 + (y / 0.4) ** 2 <= 1] = 0.1  # two lungs
    document = np.ones((SIZE, SIZE))
    document[4:-4:6, 6:-6] = 0.0  # lines of text
    others = np.stack([prepare(i, SIZE) for i in (ct_slice, document, rng.random((SIZE, SIZE)))])
    verdicts = gate.check(embeddings_like(others), others)
    assert all(v.ood for v in verdicts)
    assert all("layout is unlike every training X-ray" in v.reason for v in verdicts)


def test_colour_alone_flags_an_image(gate):
    image = radiographs(5, 1)
    (gray,) = gate.check(embeddings_like(image), image, colour=[0.0])
    (coloured,) = gate.check(embeddings_like(image), image, colour=[COLOUR_LIMIT + 0.1])
    assert not gray.ood
    assert coloured.ood and "colour image" in coloured.reason


def test_saved_gate_gives_the_same_verdicts(gate, tmp_path):
    gate.save(tmp_path / "ood.npz")
    loaded = OODGate.load(tmp_path / "ood.npz")
    images = np.concatenate([radiographs(6, 20), np.zeros((2, SIZE, SIZE), np.uint8)])
    before = [v.to_dict() for v in gate.check(embeddings_like(images), images)]
    after = [v.to_dict() for v in loaded.check(embeddings_like(images), images)]
    assert [b["ood"] for b in before] == [a["ood"] for a in after]
    np.testing.assert_allclose([b["layout_distance"] for b in before],
                               [a["layout_distance"] for a in after], rtol=1e-2)


def test_gate_of_an_older_version_is_refused_with_what_to_do(tmp_path):
    np.savez(tmp_path / "ood.npz", statistics_mean=np.zeros(3))
    with pytest.raises(ValueError, match="older covidxray"):
        OODGate.load(tmp_path / "ood.npz")


def test_embedding_covariance_keeps_ten_images_per_dimension():
    from covidxray.run.ood import _Mahalanobis
    rng = np.random.default_rng(0)
    small = _Mahalanobis.fit(rng.normal(size=(40, 64)), 32)
    assert small.projection.shape == (4, 64)
    large = _Mahalanobis.fit(rng.normal(size=(1000, 64)), 32)
    assert large.projection.shape == (32, 64)
    # with few dimensions per image, training images are not far outside their own fit
    x = rng.normal(size=(40, 64))
    assert np.median(_Mahalanobis.fit(x, 32).distance(x)) < 3


def test_gate_flags_a_film_without_plausible_lungs():
    from conftest import FixedLungs
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (60, 32, 32)).astype(np.uint8)
    gate = OODGate.fit(rng.normal(size=(60, 8)), train, rng.normal(size=(60, 8)), train)
    lungs = [FixedLungs([(0.2, 0.8, 0.1, 0.4), (0.2, 0.8, 0.6, 0.9)]).field(None),
             FixedLungs([(0.2, 0.8, 0.1, 0.4)], plausible=False).field(None), None]
    verdicts = gate.check(rng.normal(size=(3, 8)) * 0, train[:3], lungs=lungs)
    assert "no plausible lungs" not in verdicts[0].reason
    assert verdicts[1].ood and "no plausible lungs (lungs found on one side" in verdicts[1].reason
    assert "lungs" not in verdicts[2].reason


def test_the_lung_test_is_off_where_validation_films_have_no_plausible_lungs(tmp_path, caplog):
    """A segmenter that finds no lungs on the films the model trained on (drawn ones, another
    kind of image) would flag them all: the gate turns its lung test off, says so, and keeps
    that in the run."""
    import logging

    from conftest import FixedLungs

    from covidxray.data.dataset import LoadedImages, Record
    from covidxray.training.finalize import fit_ood_gate
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (60, 32, 32)).astype(np.uint8)
    passes = type("Forward", (), {"embeddings": rng.normal(size=(60, 8))})()
    records = [Record(f"f{i}.png", "COVID", 1) for i in range(60)]
    one_sided = FixedLungs([(0.2, 0.8, 0.1, 0.4)], plausible=False).field(None)

    def gate_with(no_lungs: int):
        val = LoadedImages(train, records, [], [r.path for r in records[:no_lungs]], True)
        with caplog.at_level(logging.WARNING):
            return fit_ood_gate(passes, LoadedImages(train, records, []), passes, val)

    kept = gate_with(3)  # 95% of them have lungs: the test stays on
    assert kept.lung_test and kept.check(passes.embeddings[:1], train[:1], lungs=[one_sided])[0].ood
    assert "lung test is off" not in caplog.text
    off = gate_with(30)
    assert not off.lung_test and "plausible lungs on only 50%" in caplog.text
    assert "lungs" not in off.check(passes.embeddings[:1], train[:1], lungs=[one_sided])[0].reason
    off.save(tmp_path / "ood.npz")
    assert not OODGate.load(tmp_path / "ood.npz").lung_test


def test_a_batch_unlike_the_validation_films_is_said_to_drift():
    from covidxray.run.ood import ks_two_sample
    rng = np.random.default_rng(1)
    train = rng.integers(0, 255, (200, 32, 32)).astype(np.uint8)
    embeddings = rng.normal(size=(400, 8))
    gate = OODGate.fit(embeddings[:200], train, embeddings[200:], train)
    alike = gate.drift(rng.normal(size=(100, 8)))
    assert not alike.drifted and alike.p_value > 0.01 and "no drift" in alike.verdict
    shifted = gate.drift(rng.normal(size=(100, 8)) * 1.6 + 0.5)
    assert shifted.drifted and shifted.verdict.startswith("DRIFT")
    assert gate.drift(rng.normal(size=(5, 8))) is None  # too few films to say
    from scipy.stats import ks_2samp
    a, b = rng.normal(size=300), rng.normal(0.2, 1, 200)
    statistic, p = ks_two_sample(a, b)
    reference = ks_2samp(a, b, method="asymp")
    assert statistic == pytest.approx(reference.statistic) and p == pytest.approx(
        reference.pvalue, rel=0.05)
