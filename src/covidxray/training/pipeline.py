"""Training batches read from files by worker threads, for data that should not sit in memory.

``ImageSequence`` is a ``keras.utils.PyDataset``: Keras runs ``__getitem__`` in ``workers``
threads while the model trains, on every backend. Each image goes through the one preprocessing
path (``pixels.preprocess.load_for_model``); with ``cache_dir`` the prepared image is kept as a small
``.npy`` named by the file's sha256 under a folder named by the preprocessing, so later epochs
and later runs skip decoding and resizing, and an edited file is a new entry.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import functools
import hashlib
import math
from pathlib import Path

import keras
import numpy as np

from covidxray.config import Preprocessing
from covidxray.fileutil import atomic_path
from covidxray.pixels.preprocess import as_preprocessing, load_for_model
from covidxray.pixels.transforms import augment_prepared


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of ``n`` items in ``epoch``: drawn from the seed and the epoch alone,
    so a resumed run sees the batches the interrupted one would have."""
    return np.random.default_rng((seed, epoch)).permutation(n)


class EpochBatches(keras.utils.PyDataset):
    """Batches of items drawn in an order that depends on the seed and the epoch alone (or
    in the given order, without ``shuffle``), with their targets and optional sample weights;
    ``batch(chosen)`` says what the items are."""

    def __init__(self, targets, batch_size: int, seed: int, shuffle: bool = True,
                 sample_weights: np.ndarray | None = None, **pydataset_options):
        super().__init__(**pydataset_options)
        self.targets = np.asarray(targets, dtype=np.float32)
        self.sample_weights = sample_weights
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0  # set it to start at another epoch (a resumed run)
        # whole batches only (split over devices); the shuffled rest waits for a later epoch
        self.drop_remainder = False

    @property
    def order(self) -> np.ndarray:
        """This epoch's order of the items."""
        if not self.shuffle:
            return np.arange(len(self.targets))
        return epoch_order(len(self.targets), self.seed, self.epoch)

    def __len__(self) -> int:
        if self.drop_remainder:  # distribute.fit_to_devices made at least one whole batch
            return len(self.targets) // self.batch_size
        return math.ceil(len(self.targets) / self.batch_size)

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        batch = (self.inputs(chosen), self.targets[chosen])
        return batch if self.sample_weights is None else (*batch, self.sample_weights[chosen])

    def inputs(self, chosen: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        self.epoch += 1


class ImageSequence(EpochBatches):
    """Batches ``(images (b, size, size, 1) uint8, targets (b,) float32)`` from files, or from
    images already prepared and held in memory (``items`` an (n, size, size) uint8 array).

    With ``shuffle`` the order changes every epoch, drawn from ``seed`` and the epoch number;
    without, batches follow ``items``, the same as ``data.load_images`` of them. ``augment``
    (e.g. ``transforms.SourceAugment``) changes each image with a generator seeded by ``seed``,
    the epoch and the image's index: reproducible, and different every epoch.
    """

    def __init__(self, items, targets, spec: int | Preprocessing, batch_size: int = 32,
                 shuffle: bool = False, seed: int = 0, cache_dir: str | Path | None = None,
                 workers: int = 2, augment=None, sample_weights: np.ndarray | None = None,
                 segmenter=None):
        super().__init__(targets, batch_size, seed, shuffle, sample_weights, workers=workers,
                         use_multiprocessing=False)
        if len(items) != len(targets):
            raise ValueError(f"{len(items)} images but {len(targets)} targets")
        self.images = items if isinstance(items, np.ndarray) else None
        self.paths = None if self.images is not None else [str(p) for p in items]
        self.augment = augment
        self.preprocessing = as_preprocessing(spec)
        self.segmenter = segmenter  # finds the lungs of a lung crop
        name = self.preprocessing.name + (f"-{segmenter.card.sha256[:12]}"
                                          if self.preprocessing.uses_lungs else "")
        self.cache_dir = Path(cache_dir) / name if cache_dir else None

    def inputs(self, chosen: np.ndarray) -> np.ndarray:
        return np.stack([self.image(i) for i in chosen])[..., None]

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` as the model gets it this epoch."""
        image = self.images[i] if self.images is not None else self.load(self.paths[i])
        if self.augment is None:
            return image
        return augment_prepared(image, self.augment,
                                np.random.default_rng((self.seed, self.epoch, int(i))))

    def load(self, path: str) -> np.ndarray:
        """One prepared image, from the decoded-image cache when it holds it."""
        if self.cache_dir is None:
            return load_for_model(path, self.preprocessing, segmenter=self.segmenter)
        data = Path(path).read_bytes()
        entry = self.cache_dir / f"{hashlib.sha256(data).hexdigest()}.npy"
        if entry.is_file():
            try:
                return np.load(entry)
            except (OSError, ValueError):
                pass  # a damaged entry: decode again and replace it
        image = load_for_model(path, self.preprocessing, data, self.segmenter)
        with atomic_path(entry, suffix=".npy") as tmp:
            np.save(tmp, image)
        return image


class ViewBatches(EpochBatches):
    """Batches ``(views[e][batch], targets[batch])`` where epoch ``e`` takes its own view of
    every item (the last one again once they run out), shuffled per epoch from ``seed``; for
    training on precomputed augmented views, one fresh view per epoch."""

    def __init__(self, views: list[np.ndarray], targets, batch_size: int = 32, seed: int = 0,
                 sample_weights: np.ndarray | None = None):
        super().__init__(targets, batch_size, seed, True, sample_weights)
        if not views or any(len(v) != len(self.targets) for v in views):
            raise ValueError("every view needs one row per target")
        self.views = views

    def inputs(self, chosen: np.ndarray) -> np.ndarray:
        return self.views[min(self.epoch, len(self.views) - 1)][chosen]
