"""Temperature scaling (Guo et al., 2017): fitted on validation at training time, applied to
every score the run gives. Plain numpy where it is applied (the prediction path imports no
scientific stack beyond it); fitting uses scipy."""

from __future__ import annotations

import numpy as np


def logit(scores) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def apply_temperature(scores, temperature: float) -> np.ndarray:
    """Rescale probabilities as sigmoid(logit(p) / T); T > 1 softens over-confident scores."""
    return 1 / (1 + np.exp(-logit(scores) / temperature))


def fit_temperature(y_true, scores) -> float:
    """The temperature minimising the negative log-likelihood (fitted on validation data)."""
    from scipy.optimize import minimize_scalar
    y_true = np.asarray(y_true, dtype=np.float64).ravel()
    logits = logit(np.asarray(scores, dtype=np.float64).ravel())
    if y_true.shape != logits.shape:
        raise ValueError(f"{y_true.size} targets but {logits.size} scores")

    def nll(log_t):
        z = logits / np.exp(log_t)
        return float(np.mean(np.logaddexp(0, z) - y_true * z))

    return float(np.exp(minimize_scalar(nll, bounds=(-4, 4), method="bounded").x))
