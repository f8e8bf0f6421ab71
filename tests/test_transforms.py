"""Every transform: deterministic under a seed, shape / dtype / range kept, label untouched, and
the intensity ones do what they claim on films that differ only in exposure."""

import numpy as np
import pytest

from covidxray.config import INTENSITY_MODES
from covidxray.data.synthetic import synthetic_radiograph
from covidxray.pixels.transforms import (
    SourceAugment,
    apply_to_item,
    crop_border,
    equalize_histogram,
    normalise_intensity,
    percentile_window,
    random_blur_or_noise,
    random_border,
    random_crop_rescale,
    random_gamma,
    random_jpeg,
)

RANDOM = [random_gamma, random_blur_or_noise, random_jpeg, random_border, random_crop_rescale,
          SourceAugment(p=1.0)]


@pytest.fixture(scope="module")
def film():
    return synthetic_radiograph(np.random.default_rng(0), 96)


def check_image(out, like):
    assert out.shape == like.shape and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("transform", RANDOM, ids=lambda t: getattr(t, "__name__", "augment"))
def test_random_transforms_are_seeded_and_keep_shape_and_range(film, transform):
    first = transform(film, np.random.default_rng(7))
    check_image(first, film)
    np.testing.assert_array_equal(first, transform(film, np.random.default_rng(7)))
    outputs = [transform(film, np.random.default_rng(seed)) for seed in range(6)]
    assert any(not np.array_equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("mode", INTENSITY_MODES)
def test_intensity_modes_keep_shape_and_range(film, mode):
    check_image(normalise_intensity(film, mode), film)


def test_intensity_normalisation_removes_an_exposure_difference(film):
    darker = 0.15 + 0.5 * film  # the same film, another source's exposure and window
    for transform in (percentile_window, equalize_histogram):
        a, b = transform(film), transform(darker)
        assert np.abs(a - b).mean() < 0.02 < np.abs(film - darker).mean()


def test_flat_images_do_not_divide_by_zero():
    flat = np.full((20, 20), 0.4, np.float32)
    for mode in INTENSITY_MODES:
        assert np.all(np.isfinite(normalise_intensity(flat, mode)))


def test_crop_border_keeps_the_centre(film):
    cropped = crop_border(film, 0.1)
    assert cropped.shape == (76, 76)  # 10 of 96 pixels off each side
    np.testing.assert_array_equal(cropped, film[10:86, 10:86])
    assert crop_border(film, 0).shape == film.shape
    with pytest.raises(ValueError):
        crop_border(film, 0.5)


def test_dictionary_form_leaves_the_label_untouched(film):
    item = {"image": film, "label": "COVID", "target": 1, "source": "raddb"}
    out = apply_to_item(SourceAugment(p=1.0), item, np.random.default_rng(3))
    assert {k: out[k] for k in ("label", "target", "source")} == \
        {"label": "COVID", "target": 1, "source": "raddb"}
    assert not np.array_equal(out["image"], film) and item["image"] is film
    assert apply_to_item(percentile_window, item)["label"] == "COVID"


def test_unknown_mode_and_bad_shape_are_refused(film):
    with pytest.raises(ValueError, match="unknown intensity mode"):
        normalise_intensity(film, "magic")
    with pytest.raises(ValueError, match="2-D"):
        percentile_window(np.zeros((4, 4, 3)))


def test_test_time_view_does_not_depend_on_the_batch(film):
    from covidxray.pixels.transforms import source_cue_view
    images = np.stack([np.rint(film * 255), np.rint(film[::-1] * 255)]).astype(np.uint8)
    view = source_cue_view(images, view=3, seed=1)
    assert view.shape == images.shape and view.dtype == np.uint8
    assert not np.array_equal(view, images)
    np.testing.assert_array_equal(view[1:], source_cue_view(images[1:], view=3, seed=1))
    np.testing.assert_array_equal(view, source_cue_view(images, view=3, seed=1))
    assert not np.array_equal(view, source_cue_view(images, view=4, seed=1))


def test_mean_over_views_averages_the_image_and_its_views(film):
    from covidxray.pixels.transforms import mean_over_views, source_cue_view
    images = np.stack([np.rint(film * 255)] * 3).astype(np.uint8)
    score = lambda x: x.reshape(len(x), -1).mean(axis=1) / 255.0  # noqa: E731
    assert np.allclose(mean_over_views(score, images, 0), score(images))
    expected = (score(images) + score(source_cue_view(images, 0))
                + score(source_cue_view(images, 1))) / 3
    assert np.allclose(mean_over_views(score, images, 2), expected, atol=1e-6)
    given = np.full(3, 0.5)  # the image's own score, already computed
    assert np.allclose(mean_over_views(score, images, 1, first=given),
                       (0.5 + score(source_cue_view(images, 0))) / 2, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (37, 90), (5, 5)])
def test_the_numpy_blur_is_scipys(shape):
    """The predict path's blur (no scipy there) gives scipy.ndimage.gaussian_filter's values."""
    from scipy.ndimage import gaussian_filter

    from covidxray.pixels.transforms import gaussian_blur
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    for sigma in (0.05, 0.3, 1.5):
        assert np.allclose(gaussian_blur(image, sigma), gaussian_filter(image, sigma), atol=1e-6)


def test_equalisation_is_interpolation_of_the_cumulative_histogram(film):
    """The in-place, by-index mapping is np.interp on the bins' upper edges (float rounding
    apart), a flat histogram out of any exposure."""
    from covidxray.pixels.transforms import equalize_histogram
    for image in (film, np.clip(film * 0.3 + 0.2, 0, 1).astype(np.float32)):
        counts, edges = np.histogram(image, bins=256, range=(0.0, 1.0))
        cdf = np.cumsum(counts).astype(np.float64)
        cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
        equalised = equalize_histogram(image)
        np.testing.assert_allclose(equalised, np.interp(image, edges[1:], cdf), atol=1e-6)
        assert equalised.dtype == np.float32 and equalised.shape == image.shape
