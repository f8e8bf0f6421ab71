"""Baselines every recipe is judged against, on the same folds.

The thumbnail baseline is a logistic regression on 16x16-pixel thumbnails: it sees only where
an image is bright or dark, nothing a radiologist would call disease. Whatever it scores on a
split is explained by image statistics alone (exposure, framing, borders, the look of a
source), so a deep model must beat it where it counts: on sources it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidxray.config import Preprocessing
from covidxray.data.dataset import Record
# the one thumbnail model, shared with the audit's image-statistics study (data may not import
# evaluation, so it lives there); THUMBNAIL_SIZE and thumbnails are this module's names too
from covidxray.data.statistics import THUMBNAIL_SIZE, logistic_regression, thumbnails
from covidxray.metrics import choose_threshold
from covidxray.pixels.preprocess import as_preprocessing


@dataclass
class BaselineScores:
    name: str
    threshold: float  # frozen on the validation records, as for a trained run
    test_records: list[Record]  # the readable test images
    test_scores: np.ndarray


def thumbnail_logistic_regression(train: list[Record], val: list[Record], test: list[Record],
                                  spec: int | Preprocessing = THUMBNAIL_SIZE,
                                  threshold_method: str = "youden",
                                  target_sensitivity: float = 0.95,
                                  segmenter=None, seed: int = 0) -> BaselineScores:
    """Fit ``data.statistics.logistic_regression`` (standardised pixels, L2-regularised,
    balanced classes; ``seed``) on ``train``, freeze the threshold on ``val``, score ``test``.
    ``spec``: the thumbnail size, or a ``Preprocessing`` with the intensity normalisation and
    crop of the recipe it sits beside (``segmenter``: for a lung crop)."""
    spec = as_preprocessing(spec)
    model = logistic_regression(seed)
    model.fit(*thumbnails(train, spec, segmenter)[:2])
    val_x, val_y, _ = thumbnails(val, spec, segmenter)
    threshold = choose_threshold(val_y, model.predict_proba(val_x)[:, 1], threshold_method,
                                 target_sensitivity)
    test_x, _, test_records = thumbnails(test, spec, segmenter)
    return BaselineScores(f"thumbnail-logistic-{spec.name}", float(threshold), test_records,
                          model.predict_proba(test_x)[:, 1])
