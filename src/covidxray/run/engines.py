"""What runs a run's model: Keras (a run folder's ``model.keras``), or onnxruntime alone (an
exported model, ``model.onnx``: no Keras, PyTorch or JAX is imported). Both give a ``Forward``
per batch: scores, embeddings for the gate, and per-location logit terms for Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from covidxray.model.outputs import Forward

ONNX_FILE = "model.onnx"
KERAS_FILE = "model.keras"


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

    def forward(self, images: np.ndarray, batch_size: int = 32, maps: bool = False) -> Forward:
        from covidxray.model.network import forward
        return forward(self.model, images, batch_size, self.extractor, maps, self.positive)

    def scores(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        from covidxray.model.network import predict_scores
        return predict_scores(self.model, images, batch_size, self.positive)

    def inference_graph(self):
        """The model with every output a prediction needs, for export."""
        from covidxray.model.network import inference_graph
        return inference_graph(self.model, self.positive)


class OnnxEngine:
    """An exported model (``deploy.export``) under onnxruntime: outputs P(positive), the
    embeddings and the logit terms, in that order."""

    model = None  # no Keras model behind it

    def __init__(self, path: Path):
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeError("an exported model needs onnxruntime: pip install onnxruntime") \
                from exc
        self.session = onnxruntime.InferenceSession(str(path),
                                                    providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def forward(self, images: np.ndarray, batch_size: int = 32, maps: bool = False) -> Forward:
        scores, embeddings, terms, probabilities = [], [], [], []
        for start in range(0, len(images), batch_size):
            batch = np.asarray(images[start:start + batch_size], np.float32)[..., None]
            score, embedding, term, *classes = self.session.run(None, {self.input: batch})
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


def load_engine(folder: Path, positive: int = 0):
    """The engine of a run folder (``model.keras``) or an exported model (``model.onnx``);
    ``positive``: the positive class's column of a softmax head."""
    if (folder / KERAS_FILE).is_file():
        return KerasEngine.load(folder / KERAS_FILE, positive)
    return OnnxEngine(folder / ONNX_FILE)
