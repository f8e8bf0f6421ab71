import keras
import numpy as np
import pytest

from conftest import predictor_of
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
