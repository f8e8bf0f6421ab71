"""What a run decides on its validation films, in one step for a trained run
(``training.finalize``) and an ensemble of runs (``training.ensemble``): the temperature (if
asked), the threshold on the calibrated scores, the out-of-distribution gate and the prediction
sets calibrated on the scores the threshold was chosen on. Plain numpy: no deep-learning
import."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from covidxray.config import DEFAULT_TARGET_SENSITIVITY, TrainConfig
from covidxray.data.dataset import LoadedImages
from covidxray.metrics import binary_metrics, choose_threshold
from covidxray.model.outputs import Forward
from covidxray.run.calibration import apply_temperature, fit_temperature
from covidxray.run.conformal import ConformalSets
from covidxray.run.ood import LUNG_TEST_MIN_SHARE, OODGate

log = logging.getLogger(__name__)
FEW_CALIBRATION_IMAGES = 20  # per class: fewer, and the prediction sets are coarse


@dataclass
class Calibrated:
    """A run's choices on its validation films, for its metadata and its run folder."""

    threshold: float
    temperature: float | None  # None: no temperature scaling
    validation_metrics: dict[str, float]  # at the threshold, on the calibrated scores
    gate: OODGate
    sets: ConformalSets  # ``sets.confidence``: the level the run states


def calibrate_and_gate(val_scores: np.ndarray, train: Forward, train_images: LoadedImages,
                       val: Forward, val_images: LoadedImages, classes: list[str], *,
                       threshold_method: str, target_sensitivity: float | None = None,
                       calibrate: bool = TrainConfig.calibrate,
                       confidence: float | None = None) -> Calibrated:
    """Temperature, threshold, gate and prediction sets of a model from its validation scores
    (P(positive) of ``val_images``, after any test-time views), its forward passes over its
    training and validation images (the gate's embeddings) and those images (the gate's
    layout test). ``classes``: [negative label, positive class], the sets' columns;
    ``target_sensitivity`` None: ``config.DEFAULT_TARGET_SENSITIVITY``; ``confidence`` None:
    ``TrainConfig.confidence``."""
    targets, scores = val_images.targets, val_scores
    temperature = None
    if calibrate:
        temperature = fit_temperature(targets, scores)
        # float32, as the predictor scores a film (run.predictor), so that a validation film
        # lands on the side of the threshold it was counted on
        scores = apply_temperature(scores, temperature).astype(np.float32)
        log.info("temperature scaling: T = %.3f (fitted on validation)", temperature)
    threshold = choose_threshold(targets, scores, threshold_method,
                                 DEFAULT_TARGET_SENSITIVITY if target_sensitivity is None
                                 else target_sensitivity)
    level = TrainConfig.confidence if confidence is None else confidence
    # prediction sets calibrated on the scores the threshold was chosen on
    sets = ConformalSets.fit(scores, targets, classes, level)
    if min(sets.sizes) < FEW_CALIBRATION_IMAGES:
        log.warning("the prediction sets are calibrated on %d and %d validation films: at "
                    "%.0f%% confidence a set can only leave a class out when (almost) no film "
                    "of it scored beyond this one, so many films will be 'uncertain: refer'",
                    *sets.sizes, 100 * level)
    return Calibrated(threshold, temperature, binary_metrics(targets, scores, threshold),
                      fit_ood_gate(train, train_images, val, val_images), sets)


def fit_ood_gate(train: Forward, train_images: LoadedImages, val: Forward,
                 val_images: LoadedImages) -> OODGate:
    """The out-of-distribution gate of a model, fitted on its passes over its own training
    and validation images."""
    if len(val_images.records) < 50:
        log.warning("the out-of-distribution gate's thresholds come from %d validation images: "
                    "with so few they are rough, and some X-rays like the training ones will "
                    "be flagged", len(val_images.records))
    lung_test = True
    if val_images.lungs_checked and val_images.records:
        share = 1 - len(val_images.no_lungs) / len(val_images.records)
        lung_test = share >= LUNG_TEST_MIN_SHARE
        if not lung_test:
            log.warning("the lung segmenter finds plausible lungs on only %.0f%% of the "
                        "validation films: the gate's lung test is off for this run (it would "
                        "flag films like the ones it trained on)", 100 * share)
    return OODGate.fit(train.embeddings, train_images.images, val.embeddings, val_images.images,
                       lung_test=lung_test)
