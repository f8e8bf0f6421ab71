"""The run-folder contract: load ``RUN/`` into a ``Predictor`` (model + metadata)."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from covidxray.data import is_image_candidate
from covidxray.imageio import ImageReadError, Preprocessing, colourfulness, decode, prepare

log = logging.getLogger(__name__)

RUN_FILES = ("model.keras", "metadata.json")


class RunError(FileNotFoundError):
    """A folder that is not a complete run."""


@dataclass
class Prediction:
    """One image's result; ``error`` is set (and the rest None) when it could not be read."""

    path: str
    probability: float | None = None
    label: str | None = None
    positive: bool | None = None
    ood: bool | None = None  # None: the run has no out-of-distribution gate
    ood_reason: str | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def collect_paths(inputs) -> list[str]:
    """Files as given, folders expanded recursively to their image files, in sorted order.

    Files named explicitly are kept whatever their suffix, so a bad one is reported, not ignored.
    """
    paths = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths.extend(str(p) for p in sorted(item.rglob("*")) if is_image_candidate(p))
        else:
            paths.append(str(item))
    return paths


class Predictor:
    """A trained model with everything needed to use it: threshold, image size, class names."""

    def __init__(self, model, metadata: dict, run_dir: str | Path | None = None, gate=None):
        from covidxray.model import feature_extractor
        self.model = model
        self.metadata = metadata
        self.run_dir = Path(run_dir) if run_dir else None
        self.gate = gate
        self.extractor = feature_extractor(model)  # built once: every prediction uses it

    @classmethod
    def load(cls, run_dir: str | Path) -> "Predictor":
        run_dir = Path(run_dir)
        missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
        if missing:
            raise RunError(f"{run_dir}: not a complete run (missing {', '.join(missing)}); "
                           f"train one with 'covidxray train DATA --out {run_dir}'")
        import keras

        import covidxray.model  # noqa: F401  registers the custom layers before loading
        from covidxray.ood import OOD_FILE, OODGate
        model = keras.saving.load_model(run_dir / "model.keras")
        metadata = json.loads((run_dir / "metadata.json").read_text())
        gate = None
        if (run_dir / OOD_FILE).is_file():
            try:
                gate = OODGate.load(run_dir / OOD_FILE)
            except (ValueError, KeyError) as error:
                log.warning("no out-of-distribution gate, verdicts are unknown: %s", error)
        return cls(model, metadata, run_dir, gate)

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def image_size(self) -> int:
        return int(self.metadata["image_size"])

    @property
    def preprocessing(self) -> Preprocessing:
        """The run's pixel preparation (runs before intensity options: resize only)."""
        steps = self.metadata.get("preprocessing", {})
        return Preprocessing(self.image_size, steps.get("intensity", "none"),
                             float(steps.get("crop", 0.0)))

    @property
    def positive_class(self) -> str:
        return self.metadata["positive_class"]

    @property
    def negative_label(self) -> str:
        negatives = self.metadata["negative_classes"]
        return negatives[0] if len(negatives) == 1 else f"NON-{self.positive_class.upper()}"

    def label_of(self, probability: float) -> str:
        return self.positive_class if probability >= self.threshold else self.negative_label

    @property
    def test_time_views(self) -> int:
        """Source-cue views averaged with each image's own score (0: the image alone)."""
        return int(self.metadata.get("test_time_views", 0))

    def predict_prepared(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(positive) for (n, size, size) uint8 images already through ``imageio.prepare``."""
        from covidxray.model import forward
        return self._final_scores(images, forward(self.model, images, batch_size,
                                                  self.extractor).scores, batch_size)

    def _final_scores(self, images: np.ndarray, scores: np.ndarray,
                      batch_size: int) -> np.ndarray:
        """The run's score from the model's score of the images themselves: the mean over the
        run's test-time views, then its temperature (both as the threshold was chosen)."""
        from covidxray.metrics import apply_temperature
        from covidxray.model import predict_scores
        from covidxray.transforms import mean_over_views
        if self.test_time_views:
            scores = mean_over_views(lambda x: predict_scores(self.model, x, batch_size),
                                     images, self.test_time_views, first=scores)
        temperature = self.metadata.get("temperature")
        return scores if not temperature else apply_temperature(scores, temperature).astype(
            np.float32)

    def analyse(self, images: np.ndarray, names: list[str], colour=None,
                batch_size: int = 32) -> tuple[list[Prediction], np.ndarray]:
        """Predictions with the out-of-distribution verdict, and Grad-CAM maps (n, h, w), from
        one forward pass over prepared images (plus one per test-time view, for the score only:
        the map and the gate see the image itself); ``colour``: each file's colourfulness."""
        from covidxray.explanation import cams_from_logit_maps
        from covidxray.model import forward
        result = forward(self.model, images, batch_size, self.extractor, maps=True)
        scores = self._final_scores(images, result.scores, batch_size)
        cams = cams_from_logit_maps(result.logit_maps)
        if self.gate is None:
            return [self._prediction(n, float(s)) for n, s in zip(names, scores)], cams
        verdicts = self.gate.check(result.embeddings, images, colour)
        return [self._prediction(n, float(s), v.ood, v.reason)
                for n, s, v in zip(names, scores, verdicts)], cams

    def predict_batch(self, images: np.ndarray, names: list[str], colour=None,
                      batch_size: int = 32) -> list[Prediction]:
        """Predictions with the out-of-distribution verdict for prepared images."""
        return self.analyse(images, names, colour, batch_size)[0]

    def prepare_array(self, array: np.ndarray) -> tuple[np.ndarray, float]:
        """A 2-D grayscale (uint8, or float in [0, 1]) or (H, W, 3) array -> model input, and its
        colourfulness."""
        array = np.asarray(array)
        colour = 0.0
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            rgb = array[..., :3]
            if np.issubdtype(rgb.dtype, np.integer):
                rgb = rgb / float(np.iinfo(rgb.dtype).max)
            colour = colourfulness(rgb)
            array = array[..., :3].mean(axis=-1)
        if array.ndim != 2:
            raise ValueError(f"expected a 2-D grayscale or (H, W, 3) image, got shape "
                             f"{array.shape}")
        if np.issubdtype(array.dtype, np.integer):
            array = array / float(np.iinfo(array.dtype).max)
        return prepare(np.clip(array, 0.0, 1.0), self.preprocessing), colour

    def predict_paths(self, paths, batch_size: int = 32, workers: int = 2) -> list[Prediction]:
        """Predict every file; unreadable ones come back with ``error`` set, in input order.

        ``workers`` threads decode the next batch while the model runs on this one.
        """
        paths = [str(p) for p in paths]
        chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
        results: list[Prediction] = []
        with ThreadPoolExecutor(max(1, workers)) as pool:
            submit = lambda chunk: [pool.submit(self._load, path) for path in chunk]  # noqa: E731
            pending = submit(chunks[0]) if chunks else []
            for index in range(len(chunks)):
                loaded = [future.result() for future in pending]
                pending = submit(chunks[index + 1]) if index + 1 < len(chunks) else []
                results += [Prediction(path=path, error=error)
                            for path, _, _, error in loaded if error]
                good = [item for item in loaded if not item[3]]
                if good:
                    results += self.predict_batch(np.stack([image for _, image, _, _ in good]),
                                                  [path for path, _, _, _ in good],
                                                  [colour for _, _, colour, _ in good],
                                                  batch_size)
        order = {path: i for i, path in enumerate(paths)}
        return sorted(results, key=lambda r: order[r.path])

    def _load(self, path: str) -> tuple[str, np.ndarray | None, float, str | None]:
        """(path, prepared image, colourfulness, None), or (path, None, 0, reason)."""
        try:
            decoded = decode(path)
        except ImageReadError as error:
            return path, None, 0.0, error.reason
        return path, prepare(decoded.gray, self.preprocessing), decoded.colourfulness, None

    def predict(self, item):
        """P(COVID) and label for a path, an array, or a list of them."""
        if isinstance(item, (list, tuple)):
            if all(isinstance(i, (str, Path)) for i in item):
                return self.predict_paths([str(i) for i in item])
            return [self.predict(i) for i in item]
        if isinstance(item, (str, Path)):
            return self.predict_paths([str(item)])[0]
        image, colour = self.prepare_array(item)
        return self.predict_batch(image[None], ["<array>"], [colour])[0]

    def _prediction(self, path: str, probability: float, ood: bool | None = None,
                    ood_reason: str | None = None) -> Prediction:
        return Prediction(path=path, probability=probability, label=self.label_of(probability),
                          positive=probability >= self.threshold, ood=ood,
                          ood_reason=ood_reason or None)
