"""Training batches read from files by worker threads, for data that should not sit in memory.

``ImageSequence`` is a ``keras.utils.PyDataset``: Keras runs ``__getitem__`` in ``workers``
threads while the model trains, on every backend. Each image goes through the one preprocessing
path (``imageio.load_for_model``); with ``cache_dir`` the prepared image is kept as a small
``.npy`` named by the file's sha256 and the size, so later epochs and later runs skip decoding
and resizing, and an edited file is a new entry.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import keras
import numpy as np

from covidxray.fileutil import atomic_path
from covidxray.imageio import load_for_model


class ImageSequence(keras.utils.PyDataset):
    """Batches ``(images (b, size, size, 1) uint8, targets (b,) float32)`` from files.

    With ``shuffle`` the order changes every epoch, drawn from ``seed`` and the epoch number;
    without, batches follow ``paths``, the same as ``data.load_images`` of them.
    """

    def __init__(self, paths, targets, image_size: int, batch_size: int = 32,
                 shuffle: bool = False, seed: int = 0, cache_dir: str | Path | None = None,
                 workers: int = 2):
        super().__init__(workers=workers, use_multiprocessing=False)
        if len(paths) != len(targets):
            raise ValueError(f"{len(paths)} paths but {len(targets)} targets")
        self.paths = [str(p) for p in paths]
        self.targets = np.asarray(targets, dtype=np.float32)
        self.image_size = image_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.cache_dir = Path(cache_dir) / f"{image_size}px" if cache_dir else None
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.paths))
        return np.random.default_rng((self.seed, self.epoch)).permutation(len(self.paths))

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def __getitem__(self, index: int):
        chosen = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = np.stack([self.load(self.paths[i]) for i in chosen])
        return images[..., None], self.targets[chosen]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self._order()

    def load(self, path: str) -> np.ndarray:
        """One prepared image, from the decoded-image cache when it holds it."""
        if self.cache_dir is None:
            return load_for_model(path, self.image_size)
        data = Path(path).read_bytes()
        entry = self.cache_dir / f"{hashlib.sha256(data).hexdigest()}.npy"
        if entry.is_file():
            try:
                return np.load(entry)
            except (OSError, ValueError):
                pass  # a damaged entry: decode again and replace it
        image = load_for_model(path, self.image_size, data)
        with atomic_path(entry, suffix=".npy") as tmp:
            np.save(tmp, image)
        return image
