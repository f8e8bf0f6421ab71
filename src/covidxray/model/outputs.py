"""What one forward pass of a classifier gives, whatever ran it (Keras, or an exported model
under onnxruntime): plain numpy, no deep-learning import."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Forward:
    """One forward pass up to the last convolutional stage, and what follows from it."""

    embeddings: np.ndarray  # (n, channels): the pooled features
    scores: np.ndarray  # (n,): P(positive), before any calibration
    logit_maps: np.ndarray | None  # (n, h, w): each location's term of the logit, if asked
    spread: np.ndarray | None = None  # (n,): an ensemble's standard deviation over members
    probabilities: np.ndarray | None = None  # (n, classes): a softmax head's, every class


def cams_from_logit_maps(logit_maps: np.ndarray) -> np.ndarray:
    """Grad-CAM in closed form: ReLU of each location's logit term, scaled to [0, 1] per image.

    Grad-CAM weights each channel k of the last convolutional stage by the mean gradient of the
    logit z (before the sigmoid, as in Selvaraju et al.; the probability's gradient vanishes
    once the model is confident), alpha_k = mean_ij dz/dF_k(i, j), and keeps
    ReLU(sum_k alpha_k F_k). Our head is global average pooling -> dropout -> one sigmoid unit,
    so that gradient is exactly w_k / (h * w): Grad-CAM is the class activation map of Zhou et
    al. (2016), and needs no backend's autograd (a test checks it against torch's).
    """
    cams = np.maximum(logit_maps, 0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)
