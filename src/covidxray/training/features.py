"""Backbone outputs computed once and reused: the frozen phase trains on pooled features,
and fine-tuning the top stages of a pretrained backbone on the output of its frozen trunk.

With the backbone frozen, every epoch of a seed-style run computes the same backbone output for
every image again; only the head (dropout + one unit) learns. Here each image's features are
computed once (and, optionally, those of K augmented views of it) and the head trains on them:
20 head epochs then cost about one forward pass over the training set.

A cache entry is keyed by the prepared pixels (so by the file's content, the reader and the
image size), the backbone's weights and input preprocessing, the Keras backend, and the
augmentation view; any change is a miss. Entries live in memory and, with a folder, on disk
(one ``.npy`` per model key, image and view, written atomically), so a second run on the same
data and weights starts from them.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from covidxray.config import AugmentConfig
from covidxray.fileutil import atomic_path
from covidxray.model.network import OUTPUT_NAME, augmentation_layers, backbone_of, forward, \
    predict_padded
from covidxray.pixels.transforms import SourceAugment, augment_prepared
from covidxray.progress import progress

log = logging.getLogger(__name__)
FEATURE_SLICE = 256  # images per call of a feature pass


def model_key(model: keras.Model, augment: AugmentConfig | None = None, seed: int = 0) -> str:
    """What decides a backbone feature besides the pixels: weights, input preprocessing,
    backend, and the augmentation of the views."""
    digest = hashlib.sha256()
    digest.update(keras.backend.backend().encode())
    preprocessing = model.get_layer("backbone_input").get_config()["mode"]
    views = None if augment is None else [dataclasses.asdict(augment), seed]
    pooled = [t.name for t in backbone_of(model).outputs] if len(backbone_of(model).outputs) > 1 \
        else None  # which stages the head pools
    digest.update(json.dumps([model.input_shape, preprocessing, views, pooled],
                             sort_keys=True).encode())
    for weight in backbone_of(model).weights:  # trainable and BatchNorm statistics alike
        digest.update(weight.path.encode())
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return digest.hexdigest()[:32]


def image_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:32]


class FeatureCache:
    """Features by (model key, image key, view), in memory and optionally on disk."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        self._memory: dict[tuple[str, str, int], np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _file(self, key: tuple[str, str, int]) -> Path:
        return self.folder / key[0] / f"{key[1]}-{key[2]}.npy"

    def get(self, key: tuple[str, str, int]) -> np.ndarray | None:
        if key in self._memory:
            return self._memory[key]
        if self.folder is not None and self._file(key).is_file():
            try:
                value = np.load(self._file(key))
            except (OSError, ValueError) as error:  # a damaged entry is a miss, not a failure
                log.warning("feature cache: ignoring %s (%s)", self._file(key), error)
                return None
            self._memory[key] = value
            return value
        return None

    def put(self, key: tuple[str, str, int], value: np.ndarray) -> None:
        self._memory[key] = value
        if self.folder is not None:
            with atomic_path(self._file(key), suffix=".npy") as tmp:
                np.save(tmp, value)

    def arrays(self, key: str, images: np.ndarray, view: int, compute) -> np.ndarray:
        """``compute(images)`` row by row, (n, ...) for (n, s, s) uint8 ``images``, computing
        only the rows missing from the cache; ``key`` names what ``compute`` does to view
        ``view`` of an image."""
        keys = [(key, image_key(image), view) for image in images]
        found = [self.get(k) for k in keys]
        missing = [i for i, value in enumerate(found) if value is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        # computed a slice at a time, so a pass over thousands of images shows its progress
        # and what was computed before an interruption stays in the cache
        for start in progress(range(0, len(missing), FEATURE_SLICE), desc="feature pass",
                              unit="slice"):
            rows = missing[start:start + FEATURE_SLICE]
            for i, value in zip(rows, compute(np.asarray(images)[rows])):
                self.put(keys[i], value)
                found[i] = value
        return np.stack(found) if found else np.zeros((0, 0), np.float32)

    def features(self, model: keras.Model, images: np.ndarray, view: int = 0,
                 augment: AugmentConfig | None = None, seed: int = 0, batch_size: int = 32,
                 key: str | None = None) -> np.ndarray:
        """Pooled features (n, channels) of ``images`` (n, s, s) uint8, computing only misses.

        View 0 is the image itself; view v > 0 is the image through the ``augment`` transforms
        seeded by ``seed`` and v, so it is the same view every time. ``key``: ``model_key`` of
        the model and augmentation, when the caller already has it.
        """
        if view > 0 and augment is None:
            raise ValueError("augmented views need an AugmentConfig")

        def pooled(batch):
            if view > 0:
                batch = augment_view(augment, batch, seed * 1000 + view)
            return forward(model, batch, batch_size).embeddings

        return self.arrays(key or model_key(model, augment, seed), images, view, pooled)

    def trunk_views(self, split: "TrunkSplit", images: np.ndarray, view: int = 0,
                    augment: SourceAugment | None = None, seed: int = 0,
                    batch_size: int = 32) -> np.ndarray:
        """The frozen trunk's output for view ``view`` of each image: view 0 is the image,
        view v > 0 the image through ``augment`` with a generator seeded by ``seed``, v and
        the image's own content, so an image's view is the same in every fold and run."""
        if view > 0 and augment is None:
            raise ValueError("augmented views need a SourceAugment")
        key = hashlib.sha256(json.dumps([split.key, dataclasses.asdict(augment) if view else None,
                                         seed if view else None]).encode()).hexdigest()[:32]

        def trunk_output(batch):
            if view > 0:
                batch = np.stack([augment_prepared(image, augment, np.random.default_rng(
                    (seed, view, int(image_key(image)[:15], 16)))) for image in batch])
            # padded: data parallel, every batch must split evenly over the devices
            return np.asarray(predict_padded(split.trunk, batch[..., None], batch_size),
                              np.float32)

        return self.arrays(key, images, view, trunk_output)


def augment_view(augment: AugmentConfig, images: np.ndarray, seed: int) -> np.ndarray:
    """One augmented view of (n, s, s) uint8 images: the training transforms, fresh layers
    seeded by ``seed``, so the same seed gives the same view."""
    augmenter = keras.Sequential(augmentation_layers(augment, seed))
    out = keras.ops.convert_to_numpy(augmenter(images[..., None].astype("float32"),
                                               training=True))
    return np.clip(np.rint(out[..., 0]), 0, 255).astype(np.uint8)


@dataclass
class TrunkSplit:
    """A classifier cut where its trainable stages begin: ``trunk`` (image -> the input of the
    first trainable stage, frozen) and ``top`` (that tensor -> P(positive)), sharing the
    classifier's layers and weights, so training ``top`` trains the classifier."""

    trunk: keras.Model
    top: keras.Model
    key: str  # model_key of the classifier and the cut: names the trunk's output


def trunk_split(model: keras.Model, prefixes: tuple[str, ...]) -> TrunkSplit | None:
    """Cut ``model`` before the first backbone layer named by ``prefixes``; None where the
    stages above the cut read a tensor from below it (no single cut exists).

    Only right for a trunk that never changes: frozen, with BatchNorm in inference mode, and
    no random augmentation inside it (the trunk leaves the model's augmentation layers out).
    """
    base = backbone_of(model)
    first = next((layer for layer in base.layers if layer.name.startswith(prefixes)), None)
    if first is None:
        return None
    cut = first.input
    try:
        upper = keras.Model(cut, base.output, name="upper")
    except ValueError:
        return None
    image = keras.Input(model.input_shape[1:], name="image")
    trunk_base = keras.Model(base.input, cut, name="trunk_base")
    trunk = keras.Model(image, trunk_base(model.get_layer("backbone_input")(image)),
                        name="trunk")
    features = keras.Input(cut.shape[1:], name="trunk_output")
    x = upper(features, training=False)  # as the classifier calls its pretrained backbone
    x = model.get_layer("dropout")(model.get_layer("pool")(x))
    top = keras.Model(features, model.get_layer(OUTPUT_NAME)(x), name="top")
    return TrunkSplit(trunk, top, model_key(model) + "/" + first.name)


def head_model(model: keras.Model) -> keras.Model:
    """The classifier's head alone (dropout -> sigmoid unit), sharing its layers and weights:
    training it on cached features trains the full model's head."""
    features = keras.Input((model.get_layer("pool").output.shape[-1],), name="features")
    x = model.get_layer("dropout")(features)
    return keras.Model(features, model.get_layer(OUTPUT_NAME)(x), name="head")
