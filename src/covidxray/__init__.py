"""covidxray: train, evaluate, explain and serve a chest X-ray COVID-19 classifier.

Research use only. Not a medical device.

The public functions (``covidxray.train``, ``load``, ``predict``...) are those of
``covidxray.api``, imported on first use (PEP 562): ``import covidxray`` itself imports nothing
heavy and changes nothing in the environment.
"""

from covidxray.version import __version__

__all__ = ["train", "load", "predict", "score", "evaluate", "explain", "audit", "report",
           "crossval", "export", "download", "models", "model_card", "__version__"]


def __getattr__(name: str):
    import importlib
    if name in __all__:
        return getattr(importlib.import_module("covidxray.api"), name)
    try:  # a subpackage or module, e.g. covidxray.api, on first use
        return importlib.import_module(f"covidxray.{name}")
    except ModuleNotFoundError as error:
        if error.name != f"covidxray.{name}":
            raise
    raise AttributeError(f"module 'covidxray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
