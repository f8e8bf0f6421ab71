"""Out-of-distribution gate: is this image like the frontal chest X-rays the model trained on?

Two Mahalanobis distances, each against the training images: one in the backbone's embedding
(reduced by PCA, covariance shrunk by Ledoit-Wolf), one over cheap image statistics (brightness,
contrast, clipping, edges, left-right symmetry, border darkness, and the layout on an 8x8 grid). Each threshold is a high
quantile of the distances of held-out validation X-rays, so about 1% of real in-distribution
images are flagged by design. Pure numpy / scikit-learn; the caller supplies embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidxray.fileutil import atomic_path

STATISTICS = ("mean", "std", "dark_fraction", "bright_fraction", "edge_density",
              "left_right_symmetry", "top_bottom_balance", "border_mean")
LAYOUT_GRID = 8  # plus the mean brightness of each cell of an 8x8 grid: where things are
EMBEDDING_COMPONENTS = 32
QUANTILE = 0.99
OOD_FILE = "ood.npz"  # in the run folder


def image_statistics(images: np.ndarray) -> np.ndarray:
    """Per image (n, size, size) uint8 -> (n, len(STATISTICS) + 64) float statistics: the named
    ones, then the layout (a frontal film has dark lungs left and right of a bright
    mediastinum; a lateral view, a CT slice or a photograph does not)."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    n, size = x.shape[0], x.shape[1]
    flat = x.reshape(n, -1)
    gradient = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)) + np.abs(np.diff(x, axis=1)).mean(
        axis=(1, 2))
    mirrored = x[:, :, ::-1]
    centred = x - x.mean(axis=(1, 2), keepdims=True)
    centred_mirror = mirrored - mirrored.mean(axis=(1, 2), keepdims=True)
    symmetry = (centred * centred_mirror).sum(axis=(1, 2)) / np.maximum(
        np.sqrt((centred ** 2).sum(axis=(1, 2)) * (centred_mirror ** 2).sum(axis=(1, 2))), 1e-8)
    half = size // 2
    edge = max(1, size // 10)
    border = np.concatenate([x[:, :edge].reshape(n, -1), x[:, -edge:].reshape(n, -1),
                             x[:, :, :edge].reshape(n, -1), x[:, :, -edge:].reshape(n, -1)], 1)
    cell = size // LAYOUT_GRID
    layout = x[:, :cell * LAYOUT_GRID, :cell * LAYOUT_GRID].reshape(
        n, LAYOUT_GRID, cell, LAYOUT_GRID, cell).mean(axis=(2, 4)).reshape(n, -1)
    named = np.stack([flat.mean(1), flat.std(1), (flat < 0.05).mean(1), (flat > 0.95).mean(1),
                      gradient, symmetry,
                      x[:, :half].mean(axis=(1, 2)) - x[:, half:].mean(axis=(1, 2)),
                      border.mean(1)], axis=1)
    return np.concatenate([named, layout], axis=1)


@dataclass
class _Mahalanobis:
    mean: np.ndarray
    precision: np.ndarray
    projection: np.ndarray | None  # PCA components (k, d), or None
    threshold: float = np.inf

    @classmethod
    def fit(cls, x: np.ndarray, components: int | None = None) -> "_Mahalanobis":
        from sklearn.covariance import LedoitWolf
        mean = x.mean(axis=0)
        projection = None
        if components is not None and x.shape[1] > components:
            k = min(components, x.shape[0] - 1)
            _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
            projection = vt[:k]
        reduced = (x - mean) @ projection.T if projection is not None else x - mean
        return cls(mean, LedoitWolf().fit(reduced).precision_, projection)

    def distance(self, x: np.ndarray) -> np.ndarray:
        centred = np.asarray(x, dtype=np.float64) - self.mean
        if self.projection is not None:
            centred = centred @ self.projection.T
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0))


@dataclass
class Verdict:
    ood: bool
    reason: str
    embedding_distance: float
    statistics_distance: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


class OODGate:
    """Flags images unlike the training X-rays; fitted at training time, saved in the run."""

    def __init__(self, embedding: _Mahalanobis, statistics: _Mahalanobis):
        self.embedding = embedding
        self.statistics = statistics

    @classmethod
    def fit(cls, train_embeddings, train_images, val_embeddings, val_images,
            quantile: float = QUANTILE) -> "OODGate":
        """Fit on training images; set each threshold at ``quantile`` of the validation
        images' distances (training distances are optimistically small)."""
        embedding = _Mahalanobis.fit(np.asarray(train_embeddings, np.float64),
                                     EMBEDDING_COMPONENTS)
        statistics = _Mahalanobis.fit(image_statistics(train_images).astype(np.float64))
        embedding.threshold = float(np.quantile(embedding.distance(val_embeddings), quantile))
        statistics.threshold = float(np.quantile(
            statistics.distance(image_statistics(val_images)), quantile))
        return cls(embedding, statistics)

    def check(self, embeddings, images) -> list[Verdict]:
        e = self.embedding.distance(embeddings)
        s = self.statistics.distance(image_statistics(images))
        verdicts = []
        for de, ds in zip(e, s):
            reasons = []
            if de > self.embedding.threshold:
                reasons.append(f"its features are unlike the training X-rays (distance "
                               f"{de:.1f} > {self.embedding.threshold:.1f})")
            if ds > self.statistics.threshold:
                reasons.append(f"its brightness, contrast, edges or symmetry are unlike the "
                               f"training X-rays (distance {ds:.1f} > "
                               f"{self.statistics.threshold:.1f})")
            reason = ("not like a frontal chest X-ray of the training data: " + "; ".join(reasons)
                      if reasons else "")
            verdicts.append(Verdict(bool(reasons), reason, float(de), float(ds)))
        return verdicts

    def save(self, path: str | Path) -> None:
        arrays = {}
        for name, part in (("embedding", self.embedding), ("statistics", self.statistics)):
            arrays[f"{name}_mean"] = part.mean
            arrays[f"{name}_precision"] = part.precision
            arrays[f"{name}_threshold"] = np.array(part.threshold)
            if part.projection is not None:
                arrays[f"{name}_projection"] = part.projection
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "OODGate":
        with np.load(path) as data:
            parts = [_Mahalanobis(data[f"{n}_mean"], data[f"{n}_precision"],
                                  data[f"{n}_projection"] if f"{n}_projection" in data else None,
                                  float(data[f"{n}_threshold"]))
                     for n in ("embedding", "statistics")]
        return cls(*parts)
