"""How well image statistics alone tell each source's classes apart, and the thumbnail model.

A logistic regression on 16x16 thumbnails, on grey-level histograms and on the files' sizes,
cross-validated within each source with both classes, under each pixel option: what a source
gives away here, a network can learn instead of the disease. The same thumbnails and the same
regression are the thumbnail baseline a recipe is judged against (``evaluation.baselines``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidxray.config import LUNG_CROP, Preprocessing
from covidxray.data.dataset import Record, load_images
from covidxray.pixels.decode import ImageReadError, header_facts, read_image
from covidxray.pixels.preprocess import as_preprocessing, prepare
from covidxray.progress import progress

THUMBNAIL_SIZE = 16  # the thumbnail's side: where an image is bright or dark, no disease

# image statistics that give a source's classes away: cross-validated ROC-AUC at or above this
SEPARABILITY_WARNING = 0.75
SEPARABILITY_FOLDS = 5
MIN_PER_CLASS = 10  # fewer images of a class in a source: its separability is not measured
STATISTICS_SIZE = 64  # the images are prepared at this size for the histogram
HISTOGRAM_BINS = 32
# the pixel options the audit tries on each two-class source (the lung crop too, where the
# caller gives the lung segmenter): how much of the class each leaves in the image statistics
AS_THEY_ARE = "as they are"
RUN_PIXELS = "this run's pixels"  # what training measures beside the files as they are
PIXEL_OPTIONS = {
    AS_THEY_ARE: Preprocessing(STATISTICS_SIZE),
    "crop 8%": Preprocessing(STATISTICS_SIZE, "none", 0.08),
    "percentile + crop 8%": Preprocessing(STATISTICS_SIZE, "percentile", 0.08),
    "equalize + crop 8%": Preprocessing(STATISTICS_SIZE, "equalize", 0.08),
    "clahe + crop 8%": Preprocessing(STATISTICS_SIZE, "clahe", 0.08),
}
LUNG_OPTIONS = {
    "equalize + lungs": Preprocessing(STATISTICS_SIZE, "equalize", LUNG_CROP),
    "clahe + lungs": Preprocessing(STATISTICS_SIZE, "clahe", LUNG_CROP),
}


def thumbnail_features(images: np.ndarray) -> np.ndarray:
    """(n, size, size) uint8 images prepared at the thumbnail size -> (n, size * size) pixel
    values in [0, 1]: the thumbnail regression's features."""
    images = np.asarray(images)
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def thumbnails(records: list[Record], spec: int | Preprocessing = THUMBNAIL_SIZE,
               segmenter=None):
    """(n, size * size) thumbnail features through the one preprocessing path (``spec``: the
    thumbnail size, or a ``Preprocessing`` at it), and the targets and records of the readable
    images (unreadable ones are left out, as in training); ``segmenter``: for a lung crop."""
    loaded = load_images(records, spec, segmenter=segmenter)
    return thumbnail_features(loaded.images), loaded.targets.astype(int), loaded.records


def logistic_regression(seed: int = 0):
    """The image-statistics model, the thumbnail baseline's too: a logistic regression on
    standardised features, L2-regularised (C=0.1), with balanced classes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(
        C=0.1, class_weight="balanced", max_iter=5000, random_state=seed))


def _histogram(image: np.ndarray) -> np.ndarray:
    """A prepared uint8 image -> its grey-level histogram (shares of HISTOGRAM_BINS bins)."""
    counts = np.bincount(image.ravel().astype(np.int64) * HISTOGRAM_BINS // 256,
                         minlength=HISTOGRAM_BINS)
    return counts / counts.sum()


def _cross_validated_auc(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int) -> float:
    """ROC-AUC of out-of-fold P(positive) of ``logistic_regression`` on ``x``, folds grouped
    by patient (where known) and stratified by class."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    folds = StratifiedGroupKFold(SEPARABILITY_FOLDS, shuffle=True, random_state=seed)
    scores = np.zeros(len(y))
    for train, test in folds.split(x, y, groups):
        model = logistic_regression(seed)
        model.fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, scores))


def image_statistics_separability(records: list[Record], options: dict | None = None,
                                  segmenter=None, seed: int = 0) -> dict:
    """For each source with both classes (at least MIN_PER_CLASS images each; records without
    a source count as one source), how well image statistics alone tell its classes apart:
    the cross-validated ROC-AUC of ``logistic_regression`` on the thumbnails (THUMBNAIL_SIZE)
    and on the grey-level histogram, under each of ``options`` (name -> ``Preprocessing``;
    default ``PIXEL_OPTIONS``, and ``LUNG_OPTIONS`` with a ``segmenter``), and on the file's
    width, height and aspect. What a source gives away here, a network can learn instead of
    the disease; the options that bring it down are the ones to train with."""
    if options is None:
        options = {**PIXEL_OPTIONS, **(LUNG_OPTIONS if segmenter is not None else {})}
    options = {name: as_preprocessing(spec) for name, spec in options.items()}
    by_source = defaultdict(list)
    for r in records:
        by_source[r.source or "(no source)"].append(r)
    found = {}
    for source, members in sorted(by_source.items()):
        counts = Counter(r.target for r in members)
        if min(counts[0], counts[1]) < MIN_PER_CLASS:
            continue
        stats = {name: ([], []) for name in options}
        sizes, kept = [], []
        for r in progress(members, desc=f"audit: image statistics of {source}"):
            try:
                data = Path(r.path).read_bytes()
                gray = read_image(r.path, data)
                width, height, _, _ = header_facts(r.path, data)
            except (OSError, ImageReadError):
                continue
            lungs = segmenter.field(gray) if segmenter is not None and any(
                spec.uses_lungs for spec in options.values()) else None
            for name, spec in options.items():
                # the thumbnail as the baseline makes it; the histogram at the option's size
                stats[name][0].append(prepare(gray, replace(spec, image_size=THUMBNAIL_SIZE),
                                              lungs))
                stats[name][1].append(_histogram(prepare(gray, spec, lungs)))
            sizes.append([np.log(width), np.log(height), width / height])
            kept.append(r)
        y = np.array([r.target for r in kept])
        groups = [r.group for r in kept]

        def auc(x):
            return _cross_validated_auc(np.asarray(x), y, groups, seed)

        result = {"images": len(kept), "positive": int(y.sum()),
                  "size_and_aspect": auc(sizes),
                  "options": {name: {"thumbnail": auc(thumbnail_features(np.array(t))),
                                     "histogram": auc(h)}
                              for name, (t, h) in stats.items()}}
        worst = {name: max(v.values()) for name, v in result["options"].items()}
        result["lowest"] = min(worst, key=worst.get)
        found[source] = result
    return found


def separability_warnings(found: dict) -> list[str]:
    """One warning per source whose classes its image statistics give away."""
    warnings = []
    for source, result in found.items():
        plain = result["options"].get(AS_THEY_ARE) or next(iter(result["options"].values()))
        worst = max(max(plain.values()), result["size_and_aspect"])
        if worst < SEPARABILITY_WARNING:
            continue
        best = RUN_PIXELS if RUN_PIXELS in result["options"] else result["lowest"]
        after = result["options"][best]
        advice = (f"as this run prepares its images they still give {after['thumbnail']:.2f} "
                  f"and {after['histogram']:.2f}" if best == RUN_PIXELS else
                  f"'{best}' brings the thumbnail and histogram down to "
                  f"{after['thumbnail']:.2f} and {after['histogram']:.2f}; train with it")
        warnings.append(
            f"source '{source}': image statistics alone tell its classes apart (cross-validated "
            f"ROC-AUC: {THUMBNAIL_SIZE}x{THUMBNAIL_SIZE} thumbnail {plain['thumbnail']:.2f}, "
            f"grey-level histogram {plain['histogram']:.2f}, size and aspect "
            f"{result['size_and_aspect']:.2f}): its classes likely come from different "
            f"collections, and a model can learn that instead of the disease; {advice}, and "
            f"judge the model on a source it never saw")
    return warnings
