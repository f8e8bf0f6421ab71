import keras
import numpy as np
import pytest

from conftest import FixedLungs, predictor_of
from covidxray.evaluation.explain import BORDER_FRACTION, border_mask, overlay, shortcut_check
from covidxray.model.network import OUTPUT_NAME, gradcam
from covidxray.pixels.transforms import resize

SIZE = 32


def tiny_classifier(seed=0):
    """A small CNN with the classifier's head (pool -> dropout -> one sigmoid unit)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(0.1, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), "binary_crossentropy")
    return model


def images_with_patch(n, where, seed):
    """Dim noise; positives (odd indices) carry a bright 6x6 patch at ``where(rng)``."""
    rng = np.random.default_rng(seed)
    images = rng.integers(40, 90, (n, SIZE, SIZE)).astype(np.uint8)
    targets = np.arange(n) % 2
    corners = []
    for i in np.flatnonzero(targets):
        r, c = where(rng)
        images[i, r:r + 6, c:c + 6] = 250
        corners.append((i, r, c))
    return images, targets.astype("float32"), corners


def central(rng):
    return rng.integers(10, 16, 2)


def in_border(rng):
    return rng.integers(0, 2), rng.integers(0, SIZE - 6)


@pytest.fixture(scope="module")
def patch_model():
    images, targets, _ = images_with_patch(200, central, seed=0)
    model = tiny_classifier()
    model.fit(images[..., None], targets, epochs=15, batch_size=20, verbose=0)
    return model


def test_gradcam_peaks_on_the_patch(patch_model):
    images, _, corners = images_with_patch(20, central, seed=1)
    cams = gradcam(patch_model, images)
    assert cams.shape == (20, SIZE // 2, SIZE // 2) and cams.max() <= 1
    hits = 0
    for i, r, c in corners:
        peak = np.unravel_index(np.argmax(resize(cams[i], (SIZE, SIZE))), (SIZE, SIZE))
        hits += (r - 2 <= peak[0] < r + 8) and (c - 2 <= peak[1] < c + 8)
    assert hits >= 0.8 * len(corners)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="autograd reference uses torch")
def test_closed_form_equals_autograd_gradcam(patch_model):
    import torch
    images, _, _ = images_with_patch(4, central, seed=2)
    features_model = keras.Model(patch_model.inputs, patch_model.get_layer("pool").input)
    dense = patch_model.get_layer(OUTPUT_NAME)
    features = features_model(images[..., None].astype("float32")).detach().requires_grad_(True)
    logit = patch_model.get_layer("pool")(features) @ dense.kernel + dense.bias  # before sigmoid
    score = logit
    score.sum().backward()
    alpha = features.grad.mean(dim=(1, 2))
    reference = torch.relu(torch.einsum("nhwc,nc->nhw", features, alpha)).detach().numpy()
    reference /= np.maximum(reference.max(axis=(1, 2), keepdims=True), 1e-12)
    np.testing.assert_allclose(gradcam(patch_model, images), reference, atol=1e-4)


def test_border_marker_model_is_flagged_and_central_one_is_not(patch_model):
    images, targets, _ = images_with_patch(200, in_border, seed=3)
    marker_model = tiny_classifier(seed=1)
    marker_model.fit(images[..., None], targets, epochs=15, batch_size=20, verbose=0)
    test_images, test_targets, _ = images_with_patch(40, in_border, seed=4)
    labels = ["COVID" if t else "NORMAL" for t in test_targets]
    flagged = shortcut_check(predictor_of(marker_model, SIZE), test_images, labels)
    assert flagged.flagged and "border" in flagged.verdict
    assert flagged.occlusion_border["COVID"] > flagged.occlusion_centre["COVID"]

    central_images, central_targets, _ = images_with_patch(40, central, seed=5)
    labels = ["COVID" if t else "NORMAL" for t in central_targets]
    clean = shortcut_check(predictor_of(patch_model, SIZE), central_images, labels)
    assert not clean.flagged and "crossval --by source" in clean.verdict
    assert clean.occlusion_centre["COVID"] > clean.occlusion_border["COVID"]


def test_border_mask_and_overlay():
    mask = border_mask(100)
    assert mask.mean() == pytest.approx(1 - (1 - 2 * BORDER_FRACTION) ** 2, abs=0.01)
    gray = np.full((50, 40), 0.5, np.float32)
    heat = np.zeros((5, 4), np.float32)
    heat[2, 2] = 1.0
    rgb = overlay(gray, heat)
    assert rgb.shape == (50, 40, 3) and rgb.dtype == np.uint8
    assert np.all(rgb[0, 0] == 128)  # no heat: the image unchanged
    assert not np.all(rgb[25, 25] == rgb[25, 25, 0])  # heat: coloured


@pytest.mark.slow
def test_explain_cli_writes_overlays(tiny_run, tiny_data, tmp_path, capsys):
    from PIL import Image

    import covidxray
    from covidxray.cli import main
    images = sorted((tiny_data / "COVID").glob("*.png"))[:2]
    (tmp_path / "bad.png").write_text("x")
    code = main(["explain", str(tiny_run), *map(str, images), str(tmp_path / "bad.png"),
                 "--out", str(tmp_path / "out")])
    assert code == 1  # one bad file
    written = sorted((tmp_path / "out").glob("*_gradcam.png"))
    assert len(written) == 2
    assert Image.open(written[0]).size == Image.open(images[0]).size
    explanation = covidxray.explain(tiny_run, images[0])
    assert explanation.heatmap.shape == np.asarray(Image.open(images[0])).shape


def test_heat_lands_where_the_marker_is_and_never_on_the_cropped_band(patch_model):
    """With a crop, the map of the cropped image is placed back on the input's own pixels: a
    marker inside the kept region gets the heat where it is; the removed band gets none."""
    predictor = predictor_of(patch_model, SIZE, crop=0.2)
    size, (top, left) = 100, (44, 52)  # kept region: 20..80 on each axis
    rng = np.random.default_rng(7)
    inside = rng.integers(40, 90, (size, size)).astype(np.uint8)
    inside[top:top + 12, left:left + 12] = 250
    result = predictor.predict(inside, heatmap=True)
    assert result.heatmap.shape == (size, size)
    peak = np.unravel_index(np.argmax(result.heatmap), result.heatmap.shape)
    assert top - 4 <= peak[0] < top + 16 and left - 4 <= peak[1] < left + 16

    in_band = rng.integers(40, 90, (size, size)).astype(np.uint8)
    in_band[4:16, 40:52] = 250  # inside the top 20% that the crop removes
    heat = predictor.predict(in_band, heatmap=True).heatmap
    band = np.ones((size, size), bool)
    band[20:80, 20:80] = False
    assert np.all(heat[band] == 0)


CENTRE_LUNGS = [(0.25, 0.75, 0.2, 0.48), (0.25, 0.75, 0.52, 0.8)]  # the patches lie here
EDGE_LUNGS = [(0.0, 1.0, 0.0, 0.12), (0.0, 1.0, 0.88, 1.0)]  # strips along the sides


def test_heat_in_the_lungs_by_construction(patch_model):
    """The patch model's heat lies where its bright patch is (the centre): all of it inside
    lungs drawn over the centre, hardly any inside lungs drawn along the sides."""
    rng = np.random.default_rng(8)
    image = rng.integers(40, 90, (SIZE, SIZE)).astype(np.uint8)
    image[12:18, 12:18] = 250
    inside = predictor_of(patch_model, SIZE, segmenter=FixedLungs(
        [(0.25, 0.75, 0.25, 0.75)])).predict(image, heatmap=True)
    assert inside.lungs_found and inside.lung_heat_share > 0.8
    outside = predictor_of(patch_model, SIZE, segmenter=FixedLungs(EDGE_LUNGS)).predict(
        image, heatmap=True)
    assert outside.lung_heat_share < 0.2
    none = predictor_of(patch_model, SIZE).predict(image, heatmap=True)
    assert none.lungs_found is None and none.lung_heat_share is None


def test_shortcut_check_judges_heat_and_occlusion_against_the_lungs(patch_model):
    images, targets, _ = images_with_patch(40, central, seed=9)
    labels = ["COVID" if t else "NORMAL" for t in targets]
    predictor = predictor_of(patch_model, SIZE)

    def masks(boxes):
        return [FixedLungs(boxes, size=SIZE).mask] * len(images)

    clean = shortcut_check(predictor, images, labels, lung_masks=masks(
        [(0.25, 0.9, 0.25, 0.75)]), sources=["a", "b"] * 20)
    assert not clean.flagged and "inside the lungs" in clean.verdict
    assert clean.lung_heat_share["COVID"] > 0.7 and clean.lungs_found == 40
    assert set(clean.lung_heat_share_per_source) == {"a", "b"}
    assert clean.occlusion_lungs["COVID"] > clean.occlusion_outside_lungs["COVID"]
    elsewhere = shortcut_check(predictor, images, labels, lung_masks=masks(EDGE_LUNGS))
    assert elsewhere.flagged and "outside the lungs" in elsewhere.verdict
    unknown = shortcut_check(predictor, images, labels, lung_masks=[None] * len(images))
    assert unknown.lungs_found is None and not unknown.flagged


def test_lung_crop_keeps_the_lungs_box(patch_model):
    """A lung crop feeds the model the box of the lungs found; the heat map goes back onto
    the input's own pixels, none of it outside that box."""
    segmenter = FixedLungs([(0.2, 0.8, 0.1, 0.45), (0.2, 0.8, 0.55, 0.9)])
    predictor = predictor_of(patch_model, SIZE, crop="lungs", segmenter=segmenter)
    image = np.random.default_rng(10).integers(40, 90, (100, 100)).astype(np.uint8)
    image[40:52, 30:42] = 250
    item = predictor.prepare(image)
    rows, cols = item.box
    assert 10 <= rows.start <= 20 and 80 <= rows.stop <= 90 and cols.start <= 10
    heat = predictor.predict(image, heatmap=True).heatmap
    outside = np.ones(heat.shape, bool)
    outside[rows, cols] = False
    assert np.all(heat[outside] == 0) and heat[40:52, 30:42].max() > 0.5
    implausible = predictor_of(patch_model, SIZE, crop="lungs",
                               segmenter=FixedLungs([(0, 1, 0, 0.4)], plausible=False))
    rows, cols = implausible.prepare(image).box  # falls back to the fixed crop
    assert (rows.start, cols.start, rows.stop) == (8, 8, 92)
    with pytest.raises(Exception, match="lung segmenter"):
        predictor_of(patch_model, SIZE, crop="lungs")


def test_lungs_hidden_warns_where_the_class_is_written_outside_the_lungs(patch_model, tmp_path):
    """Films whose class is a bright patch at the centre. Lungs drawn over the centre: hiding
    them hides the class, and the model falls to chance (no warning). Lungs drawn along the
    sides: the class is written outside them, the model still tells the classes apart with
    them hidden, and evaluate says so, overall and per source."""
    from PIL import Image

    from covidxray.data.dataset import Record
    from covidxray.evaluation.evaluate import evaluate
    from covidxray.evaluation.text import format_report
    images, targets, _ = images_with_patch(80, central, seed=11)
    records = []
    for i, (image, target) in enumerate(zip(images, targets)):
        Image.fromarray(image).save(tmp_path / f"film{i}.png")
        records.append(Record(str(tmp_path / f"film{i}.png"), "COVID" if target else "NORMAL",
                              int(target), source="a" if i % 4 < 2 else "b"))

    def evaluated(boxes):
        predictor = predictor_of(patch_model, SIZE, segmenter=FixedLungs(boxes, size=SIZE))
        return evaluate(tmp_path, predictor=predictor, records=records, n_bootstrap=200,
                        shortcut_images=0, out=tmp_path / "metrics.json")

    over_the_class = evaluated([(0.2, 0.8, 0.2, 0.8)])["lungs_hidden"]
    assert over_the_class["films_with_lungs"] == 80
    assert over_the_class["overall"]["as_they_are"]["value"] > 0.95
    assert over_the_class["overall"]["lungs_hidden"]["value"] < 0.7
    assert over_the_class["overall"]["lungs_only"]["value"] > 0.95
    assert not over_the_class["warnings"]

    beside_the_class = evaluated(EDGE_LUNGS)
    hidden = beside_the_class["lungs_hidden"]
    assert hidden["overall"]["lungs_hidden"]["value"] > 0.95
    assert set(hidden["per_source"]) == {"a", "b"}
    assert len(hidden["warnings"]) == 3  # all films, a and b
    assert "outside the lungs" in hidden["warnings"][0]
    assert "WARNING (all films)" in format_report(beside_the_class)


def test_overlay_and_heat_map_colours_are_the_textbook_blend():
    """The in-place blend and the byte colour table give exactly what the plain formulas give:
    (1 - w) * gray + w * colour with w = alpha * heat, times 255, rounded; colours rounded."""
    from covidxray.evaluation.explain import LUNG_OUTLINE_COLOUR, heat_colours
    rng = np.random.default_rng(3)
    gray = rng.random((61, 47), dtype=np.float32)
    heat = (rng.random((61, 47), dtype=np.float32) * 1.4 - 0.2)
    outline = rng.random((61, 47)) < 0.1
    clipped = np.clip(heat, 0, 1)
    colours = heat_colours(clipped)
    weight = 0.4 * clipped[..., None]
    expected = np.clip(np.rint(((1 - weight) * gray[..., None] + weight * colours) * 255), 0,
                       255).astype(np.uint8)
    expected[outline] = LUNG_OUTLINE_COLOUR
    np.testing.assert_array_equal(overlay(gray, heat, outline=outline), expected)
    np.testing.assert_array_equal(heat_colours(clipped, as_bytes=True),
                                  np.rint(colours * 255).astype(np.uint8))
