"""The backbone-feature cache: hits, misses, invalidation, disk entries, augmented views, and the
head that trains on cached features."""

import keras
import numpy as np
import pytest

from covidxray.config import AugmentConfig
from covidxray.model.network import backbone_of, build_model, forward
from covidxray.training.features import FeatureCache, augment_view, head_model, model_key


@pytest.fixture(scope="module")
def model():
    return build_model(32, weights="none", seed=0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (6, 32, 32), dtype=np.uint8)


def test_miss_then_hit_gives_the_backbone_features(model, images):
    cache = FeatureCache()
    first = cache.features(model, images)
    assert (cache.hits, cache.misses) == (0, 6)
    second = cache.features(model, images)
    assert (cache.hits, cache.misses) == (6, 6)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, forward(model, images).embeddings, atol=1e-5)


def test_a_changed_image_is_the_only_miss(model, images):
    cache = FeatureCache()
    cache.features(model, images)
    changed = images.copy()
    changed[2, 0, 0] ^= 1
    cache.features(model, changed)
    assert cache.misses == 6 + 1


def test_key_changes_with_weights_size_and_augmentation(model):
    key = model_key(model)
    assert model_key(model) == key
    assert model_key(build_model(48, weights="none", seed=0)) != key
    assert model_key(model, AugmentConfig(), 0) != key
    assert model_key(model, AugmentConfig(), 1) != model_key(model, AugmentConfig(), 0)
    other = build_model(32, weights="none", seed=0)
    weight = backbone_of(other).weights[0]
    weight.assign(keras.ops.convert_to_numpy(weight) + 0.01)
    assert model_key(other) != key


def test_disk_entries_serve_a_new_cache_and_damaged_ones_are_misses(model, images, tmp_path):
    FeatureCache(tmp_path).features(model, images)
    fresh = FeatureCache(tmp_path)
    fresh.features(model, images)
    assert (fresh.hits, fresh.misses) == (6, 0)
    entry = sorted(tmp_path.rglob("*.npy"))[0]
    entry.write_bytes(b"not an array")
    damaged = FeatureCache(tmp_path)
    damaged.features(model, images)
    assert damaged.misses == 1
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")]  # no partial file


def test_augmented_views_are_reproducible_and_differ_from_the_image(model, images):
    augment = AugmentConfig(rotation_degrees=20, zoom=0.2, translation=0.1, brightness=0,
                            contrast=0)
    np.testing.assert_array_equal(augment_view(augment, images, 5),
                                  augment_view(augment, images, 5))
    assert not np.array_equal(augment_view(augment, images, 5), images)
    cache = FeatureCache()
    plain = cache.features(model, images, 0, augment, seed=0)
    view = cache.features(model, images, 1, augment, seed=0)
    assert not np.allclose(plain, view)
    np.testing.assert_array_equal(view, FeatureCache().features(model, images, 1, augment, 0))
    with pytest.raises(ValueError, match="AugmentConfig"):
        cache.features(model, images, 1)


def test_head_model_shares_the_classifiers_head(images):
    classifier = build_model(32, weights="none", seed=1)
    head = head_model(classifier)
    features = forward(classifier, images).embeddings
    np.testing.assert_allclose(head.predict(features, verbose=0).ravel(),
                               forward(classifier, images).scores, atol=1e-5)
    head.compile(optimizer=keras.optimizers.SGD(0.5), loss="binary_crossentropy")
    head.fit(features, np.ones(len(features)), epochs=3, verbose=0)
    np.testing.assert_allclose(head.predict(features, verbose=0).ravel(),
                               classifier.predict(images[..., None], verbose=0).ravel(),
                               atol=1e-5)  # training the head trained the classifier


def test_trunk_and_top_compose_to_the_classifier(images):
    from covidxray.model.network import stage_prefixes
    from covidxray.training.features import trunk_split
    classifier = build_model(32, backbone="mobilenetv3small", weights="none", seed=0)
    split = trunk_split(classifier, stage_prefixes("mobilenetv3small", 1))
    x = images[..., None].astype("float32")
    np.testing.assert_allclose(split.top.predict(split.trunk.predict(x, verbose=0), verbose=0),
                               classifier.predict(x, verbose=0), atol=1e-5)
    shared = {id(w) for w in classifier.weights}
    assert all(id(w) in shared for w in split.top.weights)  # training top trains the classifier


def test_trunk_views_are_cached_and_seeded_by_content(images):
    from covidxray.model.network import stage_prefixes
    from covidxray.pixels.transforms import SourceAugment
    from covidxray.training.features import trunk_split
    classifier = build_model(32, backbone="mobilenetv3small", weights="none", seed=0)
    split = trunk_split(classifier, stage_prefixes("mobilenetv3small", 1))
    cache = FeatureCache()
    plain = cache.trunk_views(split, images)
    view = cache.trunk_views(split, images, 1, SourceAugment(p=1.0), seed=0)
    assert not np.allclose(plain, view)
    # the same image gets the same view whatever else is in its batch
    alone = FeatureCache().trunk_views(split, images[3:], 1, SourceAugment(p=1.0))
    np.testing.assert_allclose(alone, view[3:], atol=1e-5)
    cache.trunk_views(split, images, 1, SourceAugment(p=1.0), seed=0)
    assert cache.hits == len(images)
