"""Out-of-distribution gate: is this image like the frontal chest X-rays the model trained on?

Four tests, any one of which flags an image:

- colour: an X-ray has none, so a file whose mean chroma is over ``COLOUR_LIMIT`` (a photograph,
  a screenshot of a coloured page) is flagged before anything else is looked at;
- layout: the image shrunk to a 16x16 thumbnail and standardised (zero mean, unit variance, so
  exposure and contrast do not matter), and its mean distance to the ``NEIGHBOURS`` nearest
  training thumbnails. A frontal film has dark lungs left and right of a bright mediastinum; a
  lateral view, a CT slice, a document or a photograph has no training image near it;
- features: the Mahalanobis distance of the backbone's pooled embedding to the training
  embeddings (reduced by PCA, covariance shrunk by Ledoit-Wolf);
- lungs: the lung segmenter (``model.lungs``) finds no plausible pair of lungs (too little or
  too much lung, or lungs on one side only), as on a lateral view, a CT slice or a photograph;
  on only where it finds them on at least ``LUNG_TEST_MIN_SHARE`` of the validation films
  (a model trained on another kind of image is not made to refuse its own films).

Each fitted threshold is a high quantile of the distances of held-out validation X-rays (training
distances are optimistically small), so about 1% of real in-distribution images are flagged by
design. Pure numpy / scikit-learn; the caller supplies embeddings. The run keeps the training
thumbnails (16x16, not enough to show a patient) in ``ood.npz``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from covidxray.fileutil import atomic_path

THUMBNAIL = 16
NEIGHBOURS = 5
EMBEDDING_COMPONENTS = 32
QUANTILE = 0.995  # per fitted test: two of them together flag about 1% of validation X-rays
COLOUR_LIMIT = 0.04  # mean chroma; a gray film with a coloured arrow or label stays far below
LUNG_TEST_MIN_SHARE = 0.9  # of validation films with plausible lungs, for the lung test


def thumbnails(images: np.ndarray, size: int = THUMBNAIL) -> np.ndarray:
    """(n, s, s) uint8 images -> (n, size * size) standardised thumbnails (box-filtered)."""
    small = np.stack([np.asarray(Image.fromarray(np.asarray(i, np.uint8)).resize(
        (size, size), Image.Resampling.BOX), dtype=np.float32) for i in images]) \
        if len(images) else np.zeros((0, size, size), np.float32)
    flat = small.reshape(len(small), -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    return centred / np.maximum(centred.std(axis=1, keepdims=True), 1.0)  # flat images stay 0


def nearest_distance(reference: np.ndarray, queries: np.ndarray,
                     neighbours: int = NEIGHBOURS) -> np.ndarray:
    """Mean Euclidean distance of each query row to its ``neighbours`` nearest reference rows."""
    squared = ((queries ** 2).sum(1)[:, None] + (reference ** 2).sum(1)[None]
               - 2.0 * queries @ reference.T)
    k = min(neighbours, len(reference))
    nearest = np.partition(np.maximum(squared, 0), k - 1, axis=1)[:, :k]
    return np.sqrt(nearest).mean(axis=1)


@dataclass
class _Mahalanobis:
    mean: np.ndarray
    precision: np.ndarray
    projection: np.ndarray  # PCA components (k, d)

    @classmethod
    def fit(cls, x: np.ndarray, components: int) -> "_Mahalanobis":
        from sklearn.covariance import LedoitWolf
        mean = x.mean(axis=0)
        # about ten images per dimension for a covariance worth inverting: with fewer, every
        # training image sits far out of its own distribution (in-sample squared distances
        # average about the dimension) and a few validation images set the threshold
        k = max(1, min(components, x.shape[0] // 10, x.shape[1]))
        _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
        projection = vt[:k]
        return cls(mean, LedoitWolf().fit((x - mean) @ projection.T).precision_, projection)

    def distance(self, x: np.ndarray) -> np.ndarray:
        centred = (np.asarray(x, dtype=np.float64) - self.mean) @ self.projection.T
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", centred, self.precision, centred), 0))


@dataclass
class Verdict:
    ood: bool
    reason: str
    layout_distance: float
    embedding_distance: float
    colourfulness: float

    def to_dict(self) -> dict:
        return asdict(self)


DRIFT_ALPHA = 0.01  # a batch whose drift test gives a p-value below it is said to drift
MIN_DRIFT_BATCH = 20  # films: fewer, and no drift test is made


def ks_two_sample(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value (Stephens'
    approximation), in plain numpy."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    values = np.concatenate([a, b])
    statistic = float(np.max(np.abs(np.searchsorted(a, values, side="right") / len(a)
                                    - np.searchsorted(b, values, side="right") / len(b))))
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (np.sqrt(n) + 0.12 + 0.11 / np.sqrt(n)) * statistic
    k = np.arange(1, 101)
    p = float(np.clip(2 * np.sum((-1) ** (k - 1) * np.exp(-2 * k ** 2 * lam ** 2)), 0, 1)) \
        if lam > 0 else 1.0
    return statistic, p


@dataclass
class Drift:
    """Whether a batch of films is like the calibration (validation) films, by the gate's
    feature distances."""

    n: int
    reference_n: int
    statistic: float
    p_value: float
    drifted: bool
    verdict: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class OODGate:
    """Flags images unlike the training X-rays; fitted at training time, saved in the run."""

    train_thumbnails: np.ndarray
    layout_threshold: float
    embedding: _Mahalanobis
    embedding_threshold: float
    # the validation films' feature distances: the reference of the drift test (None: a gate
    # of an older version)
    reference_distances: np.ndarray | None = None
    lung_test: bool = True  # films without plausible lungs are flagged

    @classmethod
    def fit(cls, train_embeddings, train_images, val_embeddings, val_images,
            quantile: float = QUANTILE, lung_test: bool = True) -> "OODGate":
        """Fit on training images; each threshold is ``quantile`` of the validation images'
        distances."""
        reference = thumbnails(train_images)
        embedding = _Mahalanobis.fit(np.asarray(train_embeddings, np.float64),
                                     EMBEDDING_COMPONENTS)
        distances = embedding.distance(val_embeddings)
        return cls(reference,
                   float(np.quantile(nearest_distance(reference, thumbnails(val_images)),
                                     quantile)),
                   embedding, float(np.quantile(distances, quantile)), distances, lung_test)

    def drift(self, embeddings) -> Drift | None:
        """The two-sample Kolmogorov-Smirnov test of a batch's feature distances against the
        validation films' (the films the prediction sets were calibrated on): a small p-value
        says the batch is not like them, and the sets' stated error rate need not hold for it.
        None for fewer than ``MIN_DRIFT_BATCH`` films or a gate of an older version."""
        if self.reference_distances is None or len(embeddings) < MIN_DRIFT_BATCH:
            return None
        return self.drift_of_distances(self.embedding.distance(embeddings))

    def drift_of_distances(self, distances) -> Drift | None:
        """``drift`` of feature distances already measured (``Prediction.feature_distance``)."""
        distances = np.asarray([d for d in distances if d is not None], float)
        if self.reference_distances is None or len(distances) < MIN_DRIFT_BATCH:
            return None
        statistic, p = ks_two_sample(distances, self.reference_distances)
        drifted = p < DRIFT_ALPHA
        verdict = (f"DRIFT: these {len(distances)} films are not like the validation films the "
                   f"prediction sets were calibrated on (feature distances, Kolmogorov-Smirnov "
                   f"p = {p:.2g}): the stated error rate need not hold for them"
                   if drifted else
                   f"no drift found: the {len(distances)} films' feature distances are like the "
                   f"validation films' (Kolmogorov-Smirnov p = {p:.2g}); that does not prove they "
                   f"are alike")
        return Drift(len(distances), len(self.reference_distances), statistic, p, drifted,
                     verdict)

    def check(self, embeddings, images, colour=None, lungs=None) -> list[Verdict]:
        """One verdict per image; ``colour`` holds each file's colourfulness (None: unknown),
        ``lungs`` each image's ``pixels.lungfield.LungField`` (None: not looked for)."""
        layout = nearest_distance(self.train_thumbnails, thumbnails(images))
        features = self.embedding.distance(embeddings)
        colour = np.zeros(len(layout)) if colour is None else np.asarray(colour, float)
        lungs = [None] * len(layout) if lungs is None else lungs
        verdicts = []
        for dl, de, chroma, field in zip(layout, features, colour, lungs):
            reasons = []
            if self.lung_test and field is not None and not field.plausible:
                reasons.append(f"no plausible lungs ({field.reason})")
            if chroma > COLOUR_LIMIT:
                reasons.append(f"it is a colour image (mean chroma {chroma:.2f} > "
                               f"{COLOUR_LIMIT}); X-rays are gray")
            if dl > self.layout_threshold:
                reasons.append(f"its layout is unlike every training X-ray (thumbnail distance "
                               f"{dl:.1f} > {self.layout_threshold:.1f})")
            if de > self.embedding_threshold:
                reasons.append(f"its features are unlike the training X-rays (distance "
                               f"{de:.1f} > {self.embedding_threshold:.1f})")
            reason = ("not like a frontal chest X-ray of the training data: " + "; ".join(reasons)
                      if reasons else "")
            verdicts.append(Verdict(bool(reasons), reason, float(dl), float(de), float(chroma)))
        return verdicts

    def save(self, path: str | Path) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, train_thumbnails=self.train_thumbnails.astype(np.float16),
                     layout_threshold=self.layout_threshold,
                     embedding_mean=self.embedding.mean,
                     embedding_precision=self.embedding.precision,
                     embedding_projection=self.embedding.projection,
                     embedding_threshold=self.embedding_threshold, lung_test=self.lung_test,
                     **({} if self.reference_distances is None else
                        {"reference_distances": self.reference_distances}))

    @classmethod
    def load(cls, path: str | Path) -> "OODGate":
        with np.load(path) as data:
            if "train_thumbnails" not in data:
                raise ValueError(f"{path}: a gate from an older covidxray; fit a new one with "
                                 f"'python bench/ood_rates.py RUN --refit'")
            return cls(data["train_thumbnails"].astype(np.float32),
                       float(data["layout_threshold"]),
                       _Mahalanobis(data["embedding_mean"], data["embedding_precision"],
                                    data["embedding_projection"]),
                       float(data["embedding_threshold"]),
                       data["reference_distances"] if "reference_distances" in data else None,
                       bool(data["lung_test"]) if "lung_test" in data else True)
