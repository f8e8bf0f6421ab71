"""The Python API; it mirrors the command line (``covidxray train|evaluate|predict``)."""

from __future__ import annotations

from pathlib import Path


def train(data: str | Path, out: str | Path, resume: bool = False, verbose: int | str = "auto",
          **options) -> Path:
    """Train on ``data`` and write the run folder ``out``; ``options`` are ``TrainConfig`` fields.

    >>> covidxray.train("data/", "runs/r1", image_size=224, weights="imagenet")  # doctest: +SKIP
    """
    from covidxray.config import TrainConfig
    from covidxray.training.fit import train as train_run
    return train_run(TrainConfig(data=str(data), out=str(out), **options), resume=resume,
                     verbose=verbose)


def load(run: str | Path):
    """Load a run folder into a ``Predictor``; ``.predict(path_or_array)`` gives P(COVID)."""
    from covidxray.run.predictor import Predictor
    return Predictor.load(run)


def predict(run: str | Path, paths) -> list:
    """Predict files and folders (recursive) with a run; unreadable files carry ``error``."""
    from covidxray.run.predictor import Predictor, collect_paths
    if isinstance(paths, (str, Path)):
        paths = [paths]
    return Predictor.load(run).predict_paths(collect_paths(paths))


def evaluate(run: str | Path, data: str | Path | None = None, **options) -> dict:
    """Metrics of a run at its frozen threshold on ``data`` (default: its own test split)."""
    from covidxray.evaluation.evaluate import evaluate as evaluate_run
    return evaluate_run(run, data, **options)


def explain(run: str | Path, path: str | Path):
    """Grad-CAM of one image: an ``Explanation`` with ``.heatmap`` (the array, [0, 1], at the
    image's resolution), ``.overlay`` (RGB), ``.probability`` and ``.label``."""
    from covidxray.evaluation.explain import explain_image
    from covidxray.run.predictor import Predictor
    return explain_image(Predictor.load(run), str(path))
