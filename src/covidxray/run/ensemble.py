"""An ensemble is a run: its folder holds its members (complete run folders, or exported
ones) under ``members/``, and its own metadata, threshold, gate and prediction sets, chosen on
the validation films the members have in common (``training.ensemble`` builds it).

Its ``EnsembleEngine`` answers as any engine does, for a stack of the members' inputs
(n, K, size, size): each member prepares its own input (its own intensity normalisation; the
members share the image size and the crop, so that their heat maps lie on the same pixels).
P(positive) is the mean of the members' own final scores, the spread between them is kept per
image, the embeddings for the gate are the members' side by side, and the heat map is the mean
of the members' Grad-CAM maps.
"""

from __future__ import annotations

import numpy as np

from covidxray.errors import UserError
from covidxray.model.outputs import Forward, cams_from_logit_maps
from covidxray.pixels.transforms import resize



class EnsembleError(UserError, ValueError):
    """Runs that cannot be one ensemble (the message says why)."""


class EnsembleEngine:
    """K member ``Predictor``s as one engine."""

    model = None  # no single Keras model behind it

    def __init__(self, members: list):
        self.members = members

    def forward(self, images: np.ndarray, batch_size: int = 32, maps: bool = False) -> Forward:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != len(self.members):
            raise ValueError(f"an ensemble of {len(self.members)} members takes (n, "
                             f"{len(self.members)}, size, size) inputs, got {images.shape}")
        passes = [m.engine.forward(images[:, k], batch_size, maps)
                  for k, m in enumerate(self.members)]
        scores = np.stack([m._final_scores(images[:, k], p.scores, batch_size)
                           for k, (m, p) in enumerate(zip(self.members, passes))])
        heat = None
        if maps:
            cams = [cams_from_logit_maps(p.logit_maps) for p in passes]
            shape = max((c.shape[1:] for c in cams), key=lambda s: s[0] * s[1])
            heat = np.mean([np.stack([resize(m, shape) for m in c]) if c.shape[1:] != shape
                            else c for c in cams], axis=0)
        return Forward(np.concatenate([p.embeddings for p in passes], axis=1),
                       scores.mean(axis=0).astype(np.float32), heat,
                       scores.std(axis=0).astype(np.float32))

    def scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        return self.forward(images, batch_size).scores

