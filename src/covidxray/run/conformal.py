"""Prediction sets with a stated error rate: split conformal classification, Mondrian by class.

At the end of training the run's validation images calibrate it: for each class c, the
nonconformity of its own images, alpha = 1 - P(c) (the hinge score). A new film gets, for each
class c, the p-value of 1 - P(c) among class c's calibration scores, and its set holds the
classes whose p-value exceeds 1 - confidence. Under exchangeability (the new film is like the
calibration films), the set misses a film's true class with probability at most
1 - confidence, for COVID films and non-COVID films separately (Vovk et al. 2005; Mondrian by
class, so that a rare class is not left to the majority's error rate):

- one class: the verdict, at that confidence;
- both classes (``UNCERTAIN``): the model cannot tell at that confidence: refer the film;
- no class (``UNLIKE``): the film is unlike every calibration film of either class.

The guarantee holds only for films like the calibration films: at a hospital the model never
saw, coverage must be measured (``evaluate`` and ``crossval`` report it per class and source).

Fitting goes through crepes (Boström, ``crepes.ConformalClassifier``, Mondrian categories:
well kept, class-conditional out of the box); applying a fitted set is the same formula in plain
numpy (checked equal to crepes in the tests), so that a prediction imports neither crepes nor
the scipy and scikit-learn it brings. P-values are not smoothed: the same film always gets the
same set (smoothing draws a random number per film), at the price of sets slightly more
conservative than the level asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidxray.config import TrainConfig
from covidxray.errors import UserError
from covidxray.fileutil import atomic_path

# the level a run states unless told another, set in one place: config.TrainConfig.confidence
# (0.90: with the ~90 validation films per class of a typical run, the 90% quantile rests on
# about nine tail scores, the 95% one on four or five; it moves with every film added)
DEFAULT_CONFIDENCE = TrainConfig.confidence
UNCERTAIN = "uncertain: refer"
UNLIKE = "unlike the calibration data"
# a film the out-of-distribution gate flags gets no verdict and an empty set, whatever its score
NOT_FRONTAL = "not a frontal chest X-ray: no verdict"


def hinge(probabilities: np.ndarray) -> np.ndarray:
    """Nonconformity of each class, (n, 2) for (n,) P(positive): 1 - P(class); class 0 is
    the negative class, 1 the positive."""
    p = np.asarray(probabilities, dtype=np.float64).ravel()
    return np.stack([p, 1.0 - p], axis=1)


def p_values(calibration: list[np.ndarray], alphas: np.ndarray) -> np.ndarray:
    """Non-smoothed Mondrian p-values, (n, classes): for class c, the share of class c's
    calibration scores at least as nonconforming as the film's, counting the film itself."""
    out = np.empty(alphas.shape, dtype=np.float64)
    for c, scores in enumerate(calibration):
        ordered = np.sort(scores)
        at_least = len(ordered) - np.searchsorted(ordered, alphas[:, c], side="left")
        out[:, c] = (at_least + 1) / (len(ordered) + 1)
    return out


@dataclass
class ConformalSets:
    """A fitted class-conditional conformal classifier of P(positive)."""

    classes: list[str]  # [negative label, positive class]: the order of the columns
    calibration: list[np.ndarray]  # per class, the nonconformity of its calibration images
    confidence: float = DEFAULT_CONFIDENCE

    @classmethod
    def fit(cls, probabilities, targets, classes: list[str],
            confidence: float = DEFAULT_CONFIDENCE) -> "ConformalSets":
        """Calibrate on held-out images' P(positive) and their 0/1 targets (fitted by crepes'
        Mondrian ``ConformalClassifier``, the class as the category)."""
        from crepes import ConformalClassifier
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        targets = np.asarray(targets).astype(int).ravel()
        alphas = hinge(probabilities)[np.arange(len(targets)), targets]
        if set(targets.tolist()) != {0, 1}:
            raise UserError("conformal calibration needs images of both classes")
        fitted = ConformalClassifier().fit(alphas, bins=targets)
        calibration = [np.sort(fitted.alphas[fitted.bins == c]) for c in (0, 1)]
        return cls(list(classes), calibration, float(confidence))

    def sets(self, probabilities, confidence: float | None = None) -> list[list[str]]:
        """Each film's prediction set (class names) at ``confidence`` (default: the run's)."""
        level = self.confidence if confidence is None else confidence
        included = p_values(self.calibration, hinge(probabilities)) > 1 - level
        return [[name for name, keep in zip(self.classes, row) if keep] for row in included]

    def verdict(self, prediction_set: list[str]) -> str:
        """The set in words: a class, ``UNCERTAIN`` or ``UNLIKE``."""
        if len(prediction_set) == 1:
            return prediction_set[0]
        return UNCERTAIN if prediction_set else UNLIKE

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.calibration]

    def save(self, path: str | Path) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, classes=np.array(self.classes), confidence=self.confidence,
                     **{f"calibration{c}": a for c, a in enumerate(self.calibration)})

    @classmethod
    def load(cls, path: str | Path) -> "ConformalSets":
        with np.load(path) as saved:
            return cls([str(c) for c in saved["classes"]],
                       [saved["calibration0"], saved["calibration1"]],
                       float(saved["confidence"]))


def coverage(sets: list[list[str]], labels: list[str], classes: list[str]) -> dict:
    """How the sets held on labelled films: per class, the share whose set holds their class
    (the coverage the level promises), and the shares of uncertain and unlike films."""
    out = {}
    for name in classes:
        chosen = [s for s, label in zip(sets, labels) if label == name]
        if chosen:
            out[name] = {"n": len(chosen),
                         "coverage": float(np.mean([name in s for s in chosen])),
                         "uncertain": float(np.mean([len(s) == 2 for s in chosen])),
                         "unlike": float(np.mean([len(s) == 0 for s in chosen]))}
    return out
