"""What runs a run's model. Keras trains; onnxruntime answers: a trained run's classifier is
exported once into the cache (named by the sha256 of its ``model.keras`` and the column it
scores) and run by onnxruntime alone, with no Keras, PyTorch or JAX imported; an exported
model's ``model.onnx`` is run the same way. ``RUNTIMES``: "onnx" (the default), or "keras" (the
Keras model itself, as before). Both engines give a ``Forward`` per batch: scores, embeddings
for the gate, and per-location logit terms for Grad-CAM."""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import json
import logging
import os
from pathlib import Path

import numpy as np

from covidxray.config import RUNTIMES, check_runtime
from covidxray.errors import require
from covidxray.fileutil import file_sha256, write_json_atomic
from covidxray.model import runtime
from covidxray.model.outputs import Forward

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4  # of P(positive), between an export and its Keras model


class KerasEngine:
    def __init__(self, model, positive: int = 0):
        """``positive``: the column of the positive class in a softmax head."""
        from covidxray.model.network import feature_extractor
        self.model = model
        self.positive = positive
        self.extractor = feature_extractor(model)  # built once: every prediction uses it

    @classmethod
    def load(cls, path: Path, positive: int = 0) -> "KerasEngine":
        import keras

        import covidxray.model.network  # noqa: F401  registers the custom layers before loading
        return cls(keras.saving.load_model(path), positive)

    @property
    def input_size(self) -> int | None:
        """The square input size the model takes (None: any)."""
        return self.model.input_shape[1]

    def forward(self, images: np.ndarray, batch_size: int = 32, maps: bool = False) -> Forward:
        from covidxray.model.network import forward
        return forward(self.model, images, batch_size, self.extractor, maps, self.positive)

    def scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        from covidxray.model.network import predict_scores
        return predict_scores(self.model, images, batch_size, self.positive)

    def export_onnx(self, path: Path) -> None:
        """The model with every output a prediction needs (``model.network.inference_graph``)
        as ONNX at ``path``: the graph ``OnnxEngine`` runs."""
        from covidxray.model.network import inference_graph
        runtime.export_keras(inference_graph(self.model, self.positive), path)


class OnnxEngine:
    """An exported model (``deploy.export``) under onnxruntime: outputs P(positive), the
    embeddings and the logit terms, in that order."""

    model = None  # no Keras model behind it

    def __init__(self, path: Path):
        require("onnxruntime", "an exported model", "export")
        self.path = Path(path)
        self.session = runtime.session(path)
        self.run_options = runtime.run_options()
        self.input = self.session.get_inputs()[0].name

    @property
    def input_size(self) -> int | None:
        """The square input size the graph takes (None: not fixed in the graph)."""
        size = self.session.get_inputs()[0].shape[1]
        return size if isinstance(size, int) else None

    def forward(self, images: np.ndarray, batch_size: int = 32, maps: bool = False) -> Forward:
        scores, embeddings, terms, probabilities = [], [], [], []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], np.float32)[..., None]
            score, embedding, term, *classes = self.session.run(None, {self.input: batch},
                                                                 self.run_options)
            scores.append(np.asarray(score, np.float32).ravel())
            embeddings.append(np.asarray(embedding, np.float32))
            terms.append(np.asarray(term, np.float32))
            probabilities += [np.asarray(c, np.float32) for c in classes]
        if not scores:
            return Forward(np.zeros((0, 0), np.float32), np.zeros(0, np.float32),
                           np.zeros((0, 0, 0), np.float32) if maps else None)
        return Forward(np.concatenate(embeddings), np.concatenate(scores),
                       np.concatenate(terms) if maps else None,
                       probabilities=np.concatenate(probabilities) if probabilities else None)

    def scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        return self.forward(images, batch_size).scores


def load_engine(folder: Path, positive: int = 0, runtime_name: str = RUNTIMES[0]):
    """The engine of a run folder (``model.keras``) or an exported model (``model.onnx``);
    ``positive``: the positive class's column of a softmax head. A run folder answers on
    onnxruntime (``cached_onnx``) unless ``runtime_name`` is "keras", or onnxruntime or Keras'
    exporter is not installed (then on Keras, said in the log)."""
    from covidxray.run.folder import RunFolder
    check_runtime(runtime_name)
    run = RunFolder(folder)
    if not run.keras_file.is_file():
        return OnnxEngine(run.onnx_file)
    exported = cached_onnx(run.keras_file, positive) if runtime_name == "onnx" else None
    if exported is not None:
        try:
            return OnnxEngine(exported)
        except Exception as error:  # a cached file damaged since: made again, once
            log.warning("%s cannot be loaded (%s): exported again", exported, error)
            exported.unlink(missing_ok=True)
            exported = cached_onnx(run.keras_file, positive)
            if exported is not None:
                return OnnxEngine(exported)
    return KerasEngine.load(run.keras_file, positive)


def cached_onnx(keras_file: Path, positive: int = 0) -> Path | None:
    """The classifier of ``keras_file`` as ONNX in the cache: exported the first time (seconds:
    Keras is loaded then), found by the sha256 of the file from then on. The export is
    checked against the Keras model on random inputs first (P(positive) within
    ``PARITY_TOLERANCE``) and refused otherwise, the refusal kept beside it (``.refused``) so
    that later loads do not export again. None where onnxruntime or the exporter is missing,
    or the check fails: the caller answers on Keras (a warning says why)."""
    if not runtime.available():
        log.info("onnxruntime is not installed (covidxray[export]): answering on Keras")
        return None
    path = runtime.cache_file(f"classifier-{file_sha256(keras_file)[:32]}-p{positive}")
    if path.is_file():
        return path
    refused = path.with_suffix(".refused")
    if refused.is_file():
        try:
            refusal = json.loads(refused.read_text())
        except (OSError, ValueError):
            refusal = {}
        if refusal.get("versions") == runtime.versions():
            log.warning("the ONNX export of %s differed from it by %s: answering on Keras "
                        "(delete %s to export it again)", keras_file,
                        refusal.get("difference"), refused)
            return None
        refused.unlink(missing_ok=True)  # refused by other versions: tried again
    if not runtime.can_export():
        log.warning("Keras' ONNX exporter for the %s backend is not installed: answering on "
                    "Keras, seconds slower to start", os.environ.get("KERAS_BACKEND"))
        return None
    log.info("exporting %s for onnxruntime once, into %s", keras_file, path.parent)
    keras_engine = KerasEngine.load(keras_file, positive)
    size = keras_engine.input_size
    keras_engine.export_onnx(path)
    images = np.random.default_rng(0).integers(0, 256, (4, size, size), dtype=np.uint8)
    difference = float(np.max(np.abs(keras_engine.scores(images) -
                                     OnnxEngine(path).scores(images))))
    if difference > PARITY_TOLERANCE:
        path.unlink(missing_ok=True)
        write_json_atomic(refused, {"difference": f"{difference:.2g}",
                                    "versions": runtime.versions()})
        log.warning("the ONNX export of %s differs from it by %.2g: answering on Keras",
                    keras_file, difference)
        return None
    return path
