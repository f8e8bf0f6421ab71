"""covidxray: train, evaluate, explain and serve a chest X-ray COVID-19 classifier.

Research use only. Not a medical device.
"""

import os

from covidxray.version import __version__

# torch is the fastest Keras backend on CPU; set KERAS_BACKEND=jax on a GPU. Must precede keras.
os.environ.setdefault("KERAS_BACKEND", "torch")

from covidxray.api import audit, crossval, download, evaluate, explain, export, load, \
    model_card, models, predict, report, score, train  # noqa: E402

__all__ = ["train", "load", "predict", "score", "evaluate", "explain", "audit", "report",
           "crossval", "export", "download", "models", "model_card", "__version__"]
