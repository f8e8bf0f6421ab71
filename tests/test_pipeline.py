"""The file-reading training pipeline gives the same batches as the in-memory path."""

import numpy as np
import pytest
from PIL import Image

from covidxray.data.dataset import discover, load_images
from covidxray.training.pipeline import ImageSequence


@pytest.fixture()
def records(tiny_data):
    return discover(tiny_data).records[:11]


def test_batches_equal_the_in_memory_path(records):
    loaded = load_images(records, 48)
    sequence = ImageSequence([r.path for r in records], loaded.targets, 48, batch_size=4)
    assert len(sequence) == 3
    images = np.concatenate([sequence[i][0] for i in range(len(sequence))])
    targets = np.concatenate([sequence[i][1] for i in range(len(sequence))])
    np.testing.assert_array_equal(images[..., 0], loaded.images)
    np.testing.assert_array_equal(targets, loaded.targets)


def test_shuffle_is_a_seeded_permutation_per_epoch(records):
    targets = np.arange(len(records), dtype=np.float32)  # targets show the order
    make = lambda seed: ImageSequence([r.path for r in records], targets, 32, batch_size=5,
                                      shuffle=True, seed=seed)
    first, again = make(3), make(3)
    epoch = lambda s: np.concatenate([s[i][1] for i in range(len(s))])
    order = epoch(first)
    assert sorted(order) == list(targets) and not np.array_equal(order, targets)
    np.testing.assert_array_equal(order, epoch(again))
    first.on_epoch_end()
    assert not np.array_equal(epoch(first), order)


def test_decoded_image_cache(records, tmp_path):
    paths = [r.path for r in records[:3]]
    sequence = ImageSequence(paths, np.zeros(3), 40, batch_size=3, cache_dir=tmp_path / "c")
    fresh = sequence[0][0]
    entries = sorted((tmp_path / "c" / "40px-none-crop0").glob("*.npy"))
    assert len(entries) == 3
    entries[0].write_bytes(b"damaged")  # decoded again, not an error
    np.testing.assert_array_equal(sequence[0][0], fresh)
    edited = tmp_path / "edited.png"
    Image.fromarray(np.full((50, 50), 200, np.uint8)).save(edited)
    ImageSequence([edited], np.zeros(1), 40, cache_dir=tmp_path / "c")[0]
    Image.fromarray(np.full((50, 50), 20, np.uint8)).save(edited)
    again = ImageSequence([edited], np.zeros(1), 40, cache_dir=tmp_path / "c")[0][0]
    assert again.max() == 20  # an edited file is a new entry, never a stale one


def test_in_memory_images_with_source_augmentation(records):
    from covidxray.pixels.transforms import SourceAugment
    loaded = load_images(records, 48)
    plain = ImageSequence(loaded.images, loaded.targets, 48, batch_size=11)
    np.testing.assert_array_equal(plain[0][0][..., 0], loaded.images)
    make = lambda: ImageSequence(loaded.images, loaded.targets, 48, batch_size=11, seed=2,
                                 augment=SourceAugment(p=1.0))
    first, again = make(), make()
    images, targets = first[0]
    assert images.shape == (11, 48, 48, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(targets, loaded.targets)  # labels untouched
    assert not np.array_equal(images[..., 0], loaded.images)
    np.testing.assert_array_equal(images, again[0][0])  # reproducible
    first.on_epoch_end()
    assert not np.array_equal(first[0][0], images)  # a new view every epoch


def test_a_model_fits_from_the_sequence(records):
    import keras

    from covidxray.model.network import build_model
    loaded = load_images(records, 32)
    model = build_model(32, weights="none")
    model.compile(optimizer="adam", loss="binary_crossentropy")
    history = model.fit(ImageSequence([r.path for r in records], loaded.targets, 32,
                                      batch_size=4, shuffle=True, workers=2),
                        epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert isinstance(model, keras.Model)
