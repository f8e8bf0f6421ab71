"""The lung segmenter: a small U-Net that outlines both lungs of a frontal chest X-ray.

Its weights ship in the package (``lungs_unet.npz``, float16, checked by sha256 at load) with
their model card (``lungs_unet.json``: the data and licences they come from, the held-out Dice
per subset, what the network was never shown). ``training.lungs.train_segmenter`` trains one
from folders of image/mask pairs (``data.masks``); the command is ``covidxray lungs train``.

``LungSegmenter.fields`` gives each image's ``pixels.lungfield.LungField``: what the rest of
the package crops to, outlines, measures heat in and judges (the out-of-distribution gate).

The input is the project's own preprocessing: the decoded gray image, histogram-equalised and
resized to the segmenter's square size (``Preprocessing(size, "equalize")``), so exposure and
windowing do not move the outline.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import dataclasses
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidxray.config import Preprocessing
from covidxray.errors import UserError
from covidxray.fileutil import atomic_path, file_sha256, write_json_atomic
from covidxray.model import runtime
from covidxray.pixels.preprocess import prepare
from covidxray.pixels.lungfield import LungField, lung_field

log = logging.getLogger(__name__)

WEIGHTS_NAME = "lungs_unet.npz"
CARD_NAME = "lungs_unet.json"
SHIPPED = Path(__file__).parent / WEIGHTS_NAME
EXPORT_TOLERANCE = 1e-4  # of P(lung), between the ONNX export and the Keras network
# the shipped weights' sha256: a file that differs (damaged, replaced) is refused
SHIPPED_SHA256 = "221327c62253ec2b81a493c619160cdb6bb3abca1093ddb844a3ad6a5c033b0d"


class LungModelError(UserError, RuntimeError):
    """Lung weights that cannot be used (missing, damaged, of another architecture)."""


@dataclass(frozen=True)
class LungCard:
    """The segmenter's model card: what it is, what it learned from, how good it is."""

    name: str
    image_size: int
    base_filters: int
    depth: int
    sha256: str = ""  # of the weights file
    data: list = field(default_factory=list)  # per folder: pairs, patients, licences
    heldout: dict = field(default_factory=dict)  # per folder: Dice and IoU on held-out patients
    not_shown: list = field(default_factory=list)
    licence: str = ""
    training: dict = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: Path) -> "LungCard":
        try:
            values = json.loads(Path(path).read_text())
            known = {f.name for f in dataclasses.fields(cls)}
            return cls(**{k: v for k, v in values.items() if k in known})
        except (OSError, ValueError, TypeError) as error:
            raise LungModelError(f"{path}: not a lung model card ({error})") from error


def build_unet(size: int = 128, base_filters: int = 8, depth: int = 4):
    """A U-Net (Ronneberger et al. 2015) for (size, size, 1) uint8 images (0..255) -> P(lung)
    per pixel; ``depth`` poolings, ``base_filters`` doubling at each."""
    import keras
    from keras import layers

    def block(x, filters, name):
        for k in (1, 2):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                              name=f"{name}_conv{k}")(x)
            # momentum 0.9: the moving statistics settle within the few hundred steps of a
            # small training set (the default 0.99 leaves them far off for validation)
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn{k}")(x)
            x = layers.ReLU(name=f"{name}_relu{k}")(x)
        return x

    if size % (2 ** depth):
        raise ValueError(f"size {size} must divide by {2 ** depth} for a depth of {depth}")
    inputs = keras.Input((size, size, 1), name="image")
    x = layers.Rescaling(1 / 255.0, name="scale")(inputs)
    skips = []
    for level in range(depth):
        x = block(x, base_filters * 2 ** level, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(name=f"pool{level}")(x)
    x = block(x, base_filters * 2 ** depth, "bottom")
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(name=f"up{level}")(x)
        x = layers.Concatenate(name=f"skip{level}")([x, skips[level]])
        x = block(x, base_filters * 2 ** level, f"dec{level}")
    outputs = layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="lungs")(x)
    return keras.Model(inputs, outputs, name="lungs_unet")


def save_weights(model, card: LungCard, folder: Path) -> LungCard:
    """The model's weights as float16 (``WEIGHTS_NAME``) and its card, with the weights'
    sha256, into ``folder``; returns the card as written."""
    import keras
    folder = Path(folder)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{f"w{i}": keras.ops.convert_to_numpy(w).astype(np.float16)
                                   for i, w in enumerate(model.weights)})
    with atomic_path(folder / WEIGHTS_NAME, suffix=".npz") as tmp:
        tmp.write_bytes(buffer.getvalue())
    card = dataclasses.replace(card, sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    write_json_atomic(folder / CARD_NAME, card.to_dict())
    return card


class LungSegmenter:
    """A trained segmenter: ``fields`` of decoded gray images."""

    def __init__(self, model, card: LungCard, weights_file: Path | None = None):
        self.model = model  # a Keras model, or an onnxruntime session (``from_onnx``)
        self.onnx_file: Path | None = None  # the ONNX file an onnxruntime session runs
        self.run_options = None  # its options for each run (``model.runtime.run_options``)
        self.card = card
        self.weights_file = weights_file
        self.preprocessing = Preprocessing(card.image_size, "equalize")

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "LungSegmenter":
        """The segmenter in ``folder`` (``WEIGHTS_NAME`` and ``CARD_NAME``; None: the one
        shipped with the package), its weights checked against the card's sha256 (and, for the
        shipped one, against the sha256 this code was released with)."""
        folder = Path(folder) if folder is not None else SHIPPED.parent
        weights, card_file = folder / WEIGHTS_NAME, folder / CARD_NAME
        if not weights.is_file() or not card_file.is_file():
            raise LungModelError(f"{folder}: no lung segmenter here ({WEIGHTS_NAME} and "
                                 f"{CARD_NAME}); train one with 'covidxray lungs train'")
        card = LungCard.load(card_file)
        digest = file_sha256(weights)
        expected = {card.sha256} | ({SHIPPED_SHA256} if weights == SHIPPED else set())
        if expected != {digest}:
            raise LungModelError(f"{weights}: sha256 {digest[:12]}... is not the "
                                 f"{'/'.join(e[:12] for e in expected)}... its card names "
                                 f"(damaged or replaced); reinstall covidxray or retrain it")
        cached = _onnx_cache_file(card)
        if cached is not None and cached.is_file():  # exported before: no network to build
            return cls.from_onnx(cached, card, weights)
        import keras
        model = build_unet(card.image_size, card.base_filters, card.depth)
        with np.load(weights) as saved:
            if len(saved.files) != len(model.weights):
                raise LungModelError(f"{weights}: {len(saved.files)} arrays for a network "
                                     f"of {len(model.weights)} weights")
            for i, weight in enumerate(model.weights):
                weight.assign(saved[f"w{i}"].astype(keras.backend.standardize_dtype(
                    weight.dtype)))
        return cls(model, card, weights).on_onnxruntime()

    def on_onnxruntime(self) -> "LungSegmenter":
        """The same network run by onnxruntime where it and the exporter are installed: about
        ten times as fast on a CPU as the Keras model under torch (3.7 ms a film with its batch
        normalisation folded, against 42; docs/benchmarks.md). Exported once into the cache,
        named by the weights' sha256, and checked against this network (``EXPORT_TOLERANCE``);
        itself where that cannot be done."""
        path = _onnx_cache_file(self.card)
        if path is None:
            return self
        try:
            if not path.is_file():
                runtime.export_keras(self.model, path)
                return self._checked_export(path)
            return LungSegmenter.from_onnx(path, self.card, self.weights_file)
        except Exception as error:  # an exporter missing or failing: the Keras model still works
            log.debug("lung segmenter stays on Keras (%s: %s)", type(error).__name__, error)
            return self

    def _checked_export(self, path: Path) -> "LungSegmenter":
        """The export at ``path`` as a segmenter, refused (deleted) where its P(lung) differs
        from this Keras model's by more than ``EXPORT_TOLERANCE`` on random inputs."""
        size = self.card.image_size
        images = np.random.default_rng(0).integers(0, 256, (2, size, size), dtype=np.uint8)
        exported = LungSegmenter.from_onnx(path, self.card, self.weights_file)
        difference = float(np.max(np.abs(self.probabilities(images) -
                                          exported.probabilities(images))))
        if difference > EXPORT_TOLERANCE:
            path.unlink(missing_ok=True)
            log.warning("the lung segmenter's ONNX export differs from it by %.2g: it runs on "
                        "Keras", difference)
            raise LungModelError(f"its ONNX export differs from it by {difference:.2g}")
        return exported

    @classmethod
    def from_onnx(cls, path: Path, card: LungCard,
                  weights_file: Path | None = None) -> "LungSegmenter":
        """An exported segmenter, run by onnxruntime alone (``weights_file``: the Keras
        weights it was exported from, where they are at hand)."""
        segmenter = cls(runtime.session(path), card, weights_file)
        segmenter.run_options = runtime.run_options()
        segmenter.onnx_file = Path(path)
        return segmenter

    def inputs(self, grays) -> np.ndarray:
        """(n, s, s) uint8: decoded gray images as the segmenter reads them."""
        return np.stack([prepare(g, self.preprocessing) for g in grays])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """P(lung) (n, s, s) of (n, s, s) uint8 segmenter inputs."""
        batch = np.asarray(images, np.float32)[..., None]
        if hasattr(self.model, "get_inputs"):  # onnxruntime
            out = self.model.run(None, {self.model.get_inputs()[0].name: batch},
                                 self.run_options)[0]
        else:
            import keras
            out = keras.ops.convert_to_numpy(self.model(batch, training=False))
        return np.asarray(out, np.float32)[..., 0]

    def fields(self, grays) -> list[LungField]:
        """The lung field of each decoded gray image (2-D float in [0, 1])."""
        grays = list(grays)
        if not grays:
            return []
        return [lung_field(p) for p in self.probabilities(self.inputs(grays))]

    def field(self, gray: np.ndarray) -> LungField:
        return self.fields([gray])[0]

    def export_onnx(self, path: Path) -> None:
        """The network as ONNX, for a model that runs without Keras, with its card beside it
        (``CARD_NAME``)."""
        write_json_atomic(Path(path).parent / CARD_NAME, self.card.to_dict())
        if self.onnx_file is not None:
            with atomic_path(path, suffix=".onnx") as tmp:
                tmp.write_bytes(self.onnx_file.read_bytes())
        else:
            runtime.export_keras(self.model, path)


def _onnx_cache_file(card: LungCard) -> Path | None:
    """Where ``on_onnxruntime`` keeps the network of ``card`` as ONNX (None: onnxruntime is
    not installed)."""
    return runtime.cache_file(f"lungs-{card.sha256[:32]}") if runtime.available() else None


def default_segmenter() -> LungSegmenter | None:
    """The shipped segmenter, or None (with a warning) where its weights are not installed."""
    try:
        return LungSegmenter.load()
    except LungModelError as error:
        log.warning("no lung fields: %s", error)
        return None
