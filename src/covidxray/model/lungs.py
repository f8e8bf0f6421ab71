"""Lung fields: a small U-Net that outlines both lungs of a frontal chest X-ray.

Its weights ship in the package (``lungs_unet.npz``, float16, checked by sha256 at load) with
their model card (``lungs_unet.json``: the data and licences they come from, the held-out Dice
per subset, what the network was never shown). ``train_segmenter`` trains one from folders of
image/mask pairs (``images/``, ``masks/``, ``manifest.csv``), split by patient; the command is
``covidxray lungs train``.

What the rest of the package does with a ``LungField``: crop to the lungs (``Preprocessing``
with ``crop="lungs"``: the box of the predicted lungs plus a margin), measure how much of a heat
map lies inside them, and flag films with no plausible lungs (the out-of-distribution gate).

The input is the project's own preprocessing: the decoded gray image, histogram-equalised and
resized to the segmenter's square size (``Preprocessing(size, "equalize")``), so exposure and
windowing do not move the outline.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from covidxray.config import Preprocessing
from covidxray.fileutil import atomic_path, file_sha256, write_json_atomic
from covidxray.pixels.imageio import ImageReadError, prepare, read_image
from covidxray.pixels.transforms import nearest

log = logging.getLogger(__name__)

WEIGHTS_NAME = "lungs_unet.npz"
CARD_NAME = "lungs_unet.json"
SHIPPED = Path(__file__).parent / WEIGHTS_NAME
# the shipped weights' sha256: a file that differs (damaged, replaced) is refused
SHIPPED_SHA256 = "221327c62253ec2b81a493c619160cdb6bb3abca1093ddb844a3ad6a5c033b0d"

# what a frontal chest film's lungs look like (cxr-dev's frontal films against the lateral
# views, CT images and photographs of not-frontal and scikit-image; docs/benchmarks.md): each
# bound lies beyond what 98% or more of frontal films show, so that few are flagged
AREA_RANGE = (0.06, 0.75)  # of the image: both lungs together
MIN_SECOND_LUNG = 0.45  # the smaller lung against the larger (a lateral view shows one field)
# the two lungs lie side by side (wherever the film is centred): their column ranges overlap
# by at most this much of the narrower one's width
MAX_SIDE_OVERLAP = 0.25
MAX_APEX_OFFSET = 0.12  # of the image's height, between the tops of the two lungs
MIN_ELONGATION = 1.0  # height over width of each lung: taller than wide
MIN_HEIGHT = 0.3  # of the image's height, each lung
# pixels the network is unsure of (0.2 < P(lung) < 0.8), against the lungs' area: an image
# it cannot read (a photograph) leaves many
MAX_UNSURE = 0.35
LUNG_MARGIN = 0.06  # the lung crop's margin, of the box's own height and width, on each side


class LungModelError(RuntimeError):
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


@dataclass
class LungField:
    """Where the lungs are on one image, at the segmenter's resolution."""

    mask: np.ndarray  # (s, s) bool over the whole image
    area: float  # of the image
    plausible: bool
    reason: str  # why not, when not plausible

    def box(self, shape: tuple[int, int], margin: float = LUNG_MARGIN) -> tuple[slice, slice]:
        """Rows and columns of an image of ``shape`` that hold the lungs, with ``margin`` of
        the box's size added on each side (clipped to the image)."""
        rows, cols = np.nonzero(self.mask)
        size = self.mask.shape[0]
        out = []
        for low, high, n in ((rows.min(), rows.max() + 1, shape[0]),
                             (cols.min(), cols.max() + 1, shape[1])):
            pad = margin * (high - low)
            start = int(np.floor(max(0.0, (low - pad) / size) * n))
            stop = int(np.ceil(min(1.0, (high + pad) / size) * n))
            out.append(slice(start, max(stop, start + 1)))
        return out[0], out[1]

    def bounds(self) -> list[float] | None:
        """The lungs' box as fractions of the image (top, bottom, left, right), at the
        segmenter's resolution; None where nothing was segmented."""
        if not self.mask.any():
            return None
        rows, cols = np.nonzero(self.mask)
        size = self.mask.shape[0]
        return [rows.min() / size, (rows.max() + 1) / size, cols.min() / size,
                (cols.max() + 1) / size]

    def mask_at(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask at an image's resolution (nearest neighbour)."""
        return nearest(self.mask, shape)

    def outline(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask's edge at an image's resolution: True on its boundary pixels (a line
        about one pixel in 256 of the image wide)."""
        mask = self.mask_at(shape)
        inner = mask
        for _ in range(max(1, round(max(shape) / 256))):
            inner = _eroded(inner)
        return mask & ~inner


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in ``mask`` (the image's edge counts as outside)."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
            & padded[1:-1, 2:])


def components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected regions of a boolean mask (0: background): each region
    takes the smallest flat index + 1 of its pixels. Plain numpy (the prediction path loads
    no scipy): neighbours' minima, with pointer jumping, until nothing changes."""
    height, width = mask.shape
    big = height * width + 1
    labels = np.where(mask, np.arange(1, big).reshape(height, width), 0)
    while True:
        values = np.where(mask, labels, big)
        smallest = values.copy()
        np.minimum(smallest[1:], values[:-1], out=smallest[1:])
        np.minimum(smallest[:-1], values[1:], out=smallest[:-1])
        np.minimum(smallest[:, 1:], values[:, :-1], out=smallest[:, 1:])
        np.minimum(smallest[:, :-1], values[:, 1:], out=smallest[:, :-1])
        smallest = np.where(mask, smallest, 0)
        flat = smallest.ravel()
        # a label names a pixel of the same region: take that pixel's label, if smaller
        jumped = np.where(flat > 0, flat[np.maximum(flat - 1, 0)], 0).reshape(height, width)
        merged = np.where(mask, np.minimum(smallest, jumped), 0)
        if np.array_equal(merged, labels):
            return labels
        labels = merged


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: background regions that do not touch the edge."""
    background = components(np.pad(~mask, 1, constant_values=True))  # a ring of background
    return (background != background[0, 0])[1:-1, 1:-1]


def lung_field(probabilities: np.ndarray) -> LungField:
    """The two largest connected regions above 0.5 (holes filled), and whether they look like
    the lungs of a frontal film: enough and not too much of the image, side by side, of
    similar size, their tops level, each taller than wide and tall enough, and the
    network sure of them (the bounds above; the reason names the first one failed)."""
    mask = probabilities >= 0.5
    labels = components(mask)
    found, sizes = np.unique(labels[labels > 0], return_counts=True)
    order = np.argsort(sizes)[::-1]
    keep = found[order[:2]]
    mask = _filled(np.isin(labels, keep) & mask)
    area = float(mask.mean())
    return LungField(mask, area, *_judged(probabilities, labels, keep, sizes[order[:2]], area))


def _judged(probabilities, labels, keep, sizes, area) -> tuple[bool, str]:
    """(plausible, why not) of the two largest regions ``keep`` of ``labels``."""
    height, width = labels.shape
    if not AREA_RANGE[0] <= area <= AREA_RANGE[1]:
        return False, (f"predicted lung area {area:.0%} of the image, outside the "
                       f"{AREA_RANGE[0]:.0%}-{AREA_RANGE[1]:.0%} of a frontal chest film")
    if len(keep) < 2 or sizes[1] < MIN_SECOND_LUNG * sizes[0]:
        second = sizes[1] / sizes[0] if len(keep) > 1 else 0.0
        return False, (f"one lung field only (the second region is {second:.0%} the size of "
                       f"the first), as on a lateral view")
    boxes = []
    for region in keep:
        rows, cols = np.nonzero(labels == region)
        boxes.append((rows.min(), rows.max() + 1, cols.min(), cols.max() + 1, cols.mean()))
    (_, _, left_a, right_a, _), (_, _, left_b, right_b, _) = boxes
    overlap = min(right_a, right_b) - max(left_a, left_b)
    if overlap > MAX_SIDE_OVERLAP * min(right_a - left_a, right_b - left_b):
        return False, (f"the two lung regions are not side by side (their columns overlap by "
                       f"{overlap / width:.0%} of the image's width)")
    if abs(boxes[0][0] - boxes[1][0]) > MAX_APEX_OFFSET * height:
        return False, (f"the tops of the two lung regions are "
                       f"{abs(boxes[0][0] - boxes[1][0]) / height:.0%} of the image apart")
    for top, bottom, left, right, _ in boxes:
        if bottom - top < MIN_HEIGHT * height or (bottom - top) < MIN_ELONGATION * (right - left):
            return False, (f"a lung region {(bottom - top) / height:.0%} of the image high and "
                           f"{(bottom - top) / (right - left):.1f} times as high as wide: not "
                           f"the shape of a frontal film's lung")
    unsure = float(((probabilities > 0.2) & (probabilities < 0.8)).sum() / max(
        (probabilities >= 0.5).sum(), 1))
    if unsure > MAX_UNSURE:
        return False, (f"the segmenter is unsure of {unsure:.0%} as many pixels as it calls "
                       f"lung")
    return True, ""


def heat_share(heatmap: np.ndarray, field: LungField) -> float:
    """The share of a heat map's mass (any resolution, over the whole image) that lies inside
    the lungs of ``field`` (0 for a heat map without mass)."""
    heat = np.clip(np.asarray(heatmap, np.float64), 0, None)
    total = heat.sum()
    return float((heat * field.mask_at(heat.shape)).sum() / total) if total > 0 else 0.0


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
        seven times as fast on a CPU as the Keras model under torch (5.6 against 42 ms per
        film, docs/benchmarks.md), the same output within 1e-6. Exported once into Keras'
        cache, named by the weights' sha256; itself where that cannot be done."""
        path = _onnx_cache_file(self.card)
        if path is None:
            return self
        try:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                self._export_network(path)
            return LungSegmenter.from_onnx(path, self.card, self.weights_file)
        except Exception as error:  # an exporter missing or failing: the Keras model still works
            log.debug("lung segmenter stays on Keras (%s: %s)", type(error).__name__, error)
            return self

    @classmethod
    def from_onnx(cls, path: Path, card: LungCard,
                  weights_file: Path | None = None) -> "LungSegmenter":
        """An exported segmenter, run by onnxruntime alone (``weights_file``: the Keras
        weights it was exported from, where they are at hand)."""
        import onnxruntime
        segmenter = cls(onnxruntime.InferenceSession(str(path),
                                                     providers=["CPUExecutionProvider"]),
                        card, weights_file)
        segmenter.onnx_file = Path(path)
        return segmenter

    def inputs(self, grays) -> np.ndarray:
        """(n, s, s) uint8: decoded gray images as the segmenter reads them."""
        return np.stack([prepare(g, self.preprocessing) for g in grays])

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """P(lung) (n, s, s) of (n, s, s) uint8 segmenter inputs."""
        batch = np.asarray(images, np.float32)[..., None]
        if hasattr(self.model, "get_inputs"):  # onnxruntime
            out = self.model.run(None, {self.model.get_inputs()[0].name: batch})[0]
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
            self._export_network(path)

    def _export_network(self, path: Path) -> None:
        """Keras' own ONNX export of the network."""
        import warnings

        import keras
        size = self.card.image_size
        with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model.export(str(tmp), format="onnx", verbose=False,
                              input_signature=[keras.InputSpec(shape=(None, size, size, 1),
                                                               dtype="float32")])


def _onnx_cache_file(card: LungCard) -> Path | None:
    """Where ``on_onnxruntime`` keeps the network of ``card`` as ONNX (None: onnxruntime is
    not installed)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from covidxray.model.weights import keras_cache_dir
    return keras_cache_dir() / f"covidxray-lungs-{card.sha256[:16]}.onnx"


def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (1, 1 when both are empty)."""
    overlap = float(np.logical_and(predicted, truth).sum())
    total = float(predicted.sum() + truth.sum())
    union = float(np.logical_or(predicted, truth).sum())
    return (2 * overlap / total if total else 1.0, overlap / union if union else 1.0)


# --- training ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MaskPair:
    image: str
    mask: str
    group: str  # the patient (or the image, when the manifest names none)
    subset: str  # the folder it came from
    licence: str = ""


def read_pairs(folder: str | Path) -> list[MaskPair]:
    """The image/mask pairs of a folder: ``manifest.csv`` (``file``, ``mask``, optional
    ``patient_id`` and ``image_license``, paths relative to the folder), or else every file of
    ``images/`` with the mask of the same name in ``masks/``."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "file" not in rows[0]:
            raise ValueError(f"{manifest}: needs a 'file' column (and 'mask')")
        pairs = [(row["file"], row.get("mask") or f"masks/{Path(row['file']).name}",
                  row.get("patient_id", ""), row.get("image_license", "")) for row in rows]
    else:
        pairs = [(f"images/{p.name}", f"masks/{p.name}", "", "")
                 for p in sorted((folder / "images").glob("*")) if p.is_file()]
    found = []
    for image, mask, patient, licence in pairs:
        if not (folder / mask).is_file():
            log.warning("%s: no mask %s, skipped", folder / image, folder / mask)
            continue
        found.append(MaskPair(str(folder / image), str(folder / mask),
                              f"patient:{patient}" if patient else f"image:{Path(image).name}",
                              folder.name, licence))
    if not found:
        raise ValueError(f"{folder}: no image/mask pairs (images/, masks/, manifest.csv)")
    return found


def split_groups(pairs: list[MaskPair], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """group -> "train" | "val" | "test", drawn by patient (images of one patient, in any
    folder, share a split)."""
    groups = sorted({p.group for p in pairs})
    order = np.random.default_rng(seed).permutation(len(groups))
    n_train = int(round(fractions[0] * len(groups)))
    n_val = int(round(fractions[1] * len(groups)))
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * (len(groups) - n_train - n_val)
    return {groups[i]: names[k] for k, i in enumerate(order)}


def _load_pairs(pairs: list[MaskPair], size: int):
    """Segmenter inputs (n, s, s) uint8 and soft masks (n, s, s) float32 of readable pairs."""
    spec = Preprocessing(size, "equalize")
    images, masks, kept = [], [], []
    for pair in pairs:
        try:
            gray = read_image(pair.image)
            mask = read_image(pair.mask) > 0.5
        except ImageReadError as error:
            log.warning("skipped %s", error)
            continue
        if mask.shape != gray.shape:
            log.warning("skipped %s: mask %s of another size", pair.image, pair.mask)
            continue
        images.append(prepare(gray, spec))
        masks.append(prepare(mask.astype(np.float32), size).astype(np.float32) / 255.0)
        kept.append(pair)
    return np.stack(images), np.stack(masks), kept


def _augmented(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """A random rotation, scale and shift of an image and its mask together, and a random
    gamma and contrast of the image: films come rotated, framed and exposed in many ways."""
    from scipy.ndimage import affine_transform
    size = image.shape[0]
    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.08, 0.08, 2) * size
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    centre = np.array([size / 2, size / 2])
    offset = centre - rotation @ (centre + shift)
    image = affine_transform(image.astype(np.float32) / 255.0, rotation, offset, order=1,
                             mode="constant", cval=0.0)
    mask = affine_transform(mask, rotation, offset, order=1, mode="constant", cval=0.0)
    image = np.clip(image, 0, 1) ** np.exp(rng.uniform(-0.4, 0.4))
    image = np.clip((image - 0.5) * rng.uniform(0.8, 1.2) + 0.5, 0, 1)
    return np.rint(image * 255).astype(np.float32), mask.astype(np.float32)


def _dice_loss(y_true, y_pred):
    from keras import ops
    overlap = ops.sum(y_true * y_pred, axis=(1, 2, 3))
    total = ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3))
    return 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


def _loss(y_true, y_pred):
    import keras
    return keras.losses.binary_crossentropy(y_true, y_pred, axis=(1, 2, 3)) + \
        _dice_loss(y_true, y_pred)


def heldout_scores(segmenter: LungSegmenter, pairs: list[MaskPair]) -> dict:
    """Dice and IoU of the post-processed mask against each pair's own mask, at the mask's
    own resolution: median, mean and 5th percentile per folder."""
    scores: dict[str, list] = {}
    for pair in pairs:
        gray, truth = read_image(pair.image), read_image(pair.mask) > 0.5
        predicted = segmenter.field(gray).mask_at(truth.shape)
        scores.setdefault(pair.subset, []).append(dice_iou(predicted, truth))
    return {subset: {"pairs": len(values),
                     "dice_median": float(np.median([d for d, _ in values])),
                     "dice_mean": float(np.mean([d for d, _ in values])),
                     "dice_p5": float(np.percentile([d for d, _ in values], 5)),
                     "iou_median": float(np.median([i for _, i in values])),
                     "iou_mean": float(np.mean([i for _, i in values]))}
            for subset, values in sorted(scores.items())}


NOT_SHOWN = ["normal screening films (hardly any normal film in the data)", "children",
             "lateral views, CT, or anything but adult frontal chest radiographs"]


def train_segmenter(folders, out: str | Path, image_size: int = 128, base_filters: int = 8,
                    depth: int = 4, epochs: int = 100, batch_size: int = 16, seed: int = 0,
                    patience: int = 15, learning_rate: float = 2e-3, licence: str = "",
                    verbose: int | str = "auto") -> LungCard:
    """Train a segmenter on the pairs of ``folders`` (split 70/15/15 by patient over all of
    them; the best epoch by validation Dice is kept) and write its weights and card into
    ``out``; the card carries the held-out Dice and IoU per folder."""
    import keras
    keras.utils.set_random_seed(seed)
    pairs = [p for folder in folders for p in read_pairs(folder)]
    split = split_groups(pairs, seed=seed)
    part = {name: [p for p in pairs if split[p.group] == name] for name in ("train", "val",
                                                                             "test")}
    train_images, train_masks, _ = _load_pairs(part["train"], image_size)
    val_images, val_masks, _ = _load_pairs(part["val"], image_size)
    log.info("lung segmenter: %d training pairs, %d validation, %d test (by patient)",
             len(train_images), len(val_images), len(part["test"]))

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def __len__(self):
            return int(np.ceil(len(train_images) / batch_size))

        def on_epoch_end(self):
            self.epoch += 1

        def __getitem__(self, index):
            order = np.random.default_rng((seed, self.epoch)).permutation(len(train_images))
            chosen = order[index * batch_size:(index + 1) * batch_size]
            rng = np.random.default_rng((seed, self.epoch, index))
            views = [_augmented(train_images[i], train_masks[i], rng) for i in chosen]
            return (np.stack([v[0] for v in views])[..., None],
                    np.stack([v[1] for v in views])[..., None])

    model = build_unet(image_size, base_filters, depth)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=_loss,
                  metrics=[keras.metrics.BinaryIoU(target_class_ids=[1], name="iou")])
    best = {"score": -1.0, "weights": None, "epoch": -1}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            scores = []
            probabilities = keras.ops.convert_to_numpy(model.predict(
                val_images[..., None].astype(np.float32), batch_size=32, verbose=0))[..., 0]
            for p, truth in zip(probabilities, val_masks):
                scores.append(dice_iou(lung_field(p).mask, truth >= 0.5)[0])
            score = float(np.mean(scores))
            if logs is not None:
                logs["val_dice"] = score
            if score > best["score"]:
                best.update(score=score, epoch=epoch,
                            weights=[keras.ops.convert_to_numpy(w) for w in model.weights])

    model.fit(Batches(), epochs=epochs, verbose=verbose, shuffle=False,
              callbacks=[KeepBest(), keras.callbacks.ReduceLROnPlateau(
                  "val_dice", mode="max", factor=0.5, patience=max(2, patience // 3)),
                  keras.callbacks.EarlyStopping("val_dice", mode="max", patience=patience)])
    for weight, value in zip(model.weights, best["weights"]):
        weight.assign(value)
    licences: dict[str, dict] = {}
    for p in pairs:
        counts = licences.setdefault(p.subset, {})
        counts[p.licence or "not stated"] = counts.get(p.licence or "not stated", 0) + 1
    card = LungCard(
        name=f"lungs-unet{image_size}", image_size=image_size, base_filters=base_filters,
        depth=depth,
        data=[{"folder": str(Path(f).name), "pairs": sum(p.subset == Path(f).name for p in pairs),
               "patients": len({p.group for p in pairs if p.subset == Path(f).name}),
               "image_licences": licences.get(Path(f).name, {})} for f in folders],
        not_shown=NOT_SHOWN, licence=licence or "as the masks' and images' own licences "
                                                 "(image_licences per folder)",
        training={"epochs_run": int(len(model.history.epoch)) if model.history else 0,
                  "best_epoch": best["epoch"] + 1, "val_dice": best["score"],
                  "split": "70/15/15 by patient over all folders", "seed": seed,
                  "batch_size": batch_size, "learning_rate": learning_rate,
                  "pairs": {k: len(v) for k, v in part.items()}},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = Path(out)
    card = save_weights(model, card, out)
    segmenter = LungSegmenter.load(out)
    card = dataclasses.replace(card, heldout=heldout_scores(segmenter, part["test"]))
    write_json_atomic(out / CARD_NAME, card.to_dict())
    return card


def default_segmenter() -> LungSegmenter | None:
    """The shipped segmenter, or None (with a warning) where its weights are not installed."""
    try:
        return LungSegmenter.load()
    except LungModelError as error:
        log.warning("no lung fields: %s", error)
        return None
