"""The two training phases, each a Keras ``fit`` that can stop at any moment and resume as if
it never had.

Phase 1 trains the head on a frozen backbone; phase 2 unfreezes the top stage(s) at a lower
learning rate. What a phase fits is a model sharing the classifier's layers: its head alone on
backbone features computed once (``head_fitting``), its top stages on the frozen trunk's output
(``top_fitting``), or the whole network on images (``full_fitting``).

After every epoch, ``EpochCheckpoint`` writes in one atomic file everything the next epoch
depends on: every variable of the fitted model (BatchNorm statistics and the random
generators' states included), the optimizer's state (moments, step: the learning-rate schedule
continues where it was), the best validation ROC-AUC so far and the early-stopping count. The
classifier's best weights go to their own file whenever the score improves. Batches are drawn
from the seed and the epoch alone, so a resumed phase replays exactly what was lost.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import csv
import dataclasses
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from covidxray.config import TrainConfig
from covidxray.data.dataset import DataError, LoadedImages
from covidxray.fileutil import atomic_path, write_text_atomic
from covidxray.pixels.transforms import SourceAugment
from covidxray.metrics import roc_auc
from covidxray.model.network import data_parallel_devices, predict_padded
from covidxray.training.features import FeatureCache, TrunkSplit, head_model, model_key
from covidxray.run.folder import RunFolder
from covidxray.training.pipeline import ImageSequence, ViewBatches

log = logging.getLogger(__name__)

PHASE_NAMES = {1: "head", 2: "finetune"}


@dataclass(frozen=True)
class Phase:
    number: int  # 1: head on the frozen backbone; 2: top stages unfrozen
    epochs: int
    learning_rate: float

    @property
    def name(self) -> str:
        return PHASE_NAMES[self.number]


@dataclass
class Best:
    """The best selection score so far over the phases run, and where it was reached: the
    classifier keeps the weights of that phase and epoch."""

    score: float | None = None  # validation ROC-AUC (or of the selection data, --select-on)
    phase: int | None = None
    epoch: int | None = None  # 0-based, within its phase
    per_phase: dict = dataclasses.field(default_factory=dict)  # phase -> its own best score

    @classmethod
    def from_state(cls, value) -> "Best":
        if value is None or isinstance(value, (int, float)):  # a checkpoint of an older version
            return cls(value)
        return cls(value["score"], value["phase"], value["epoch"],
                   {int(k): v for k, v in value["per_phase"].items()})


@dataclass
class Fitting:
    """What one phase fits: a model sharing the classifier's layers, its batches (a
    ``PyDataset`` whose ``epoch`` decides what it serves) and the validation arrays."""

    model: keras.Model
    batches: keras.utils.PyDataset
    validation: tuple[np.ndarray, np.ndarray]


def best_weights_file(run: Path) -> Path:
    """The classifier's weights at its best validation ROC-AUC so far, over both phases."""
    return RunFolder(run).checkpoints_folder / "best.weights.h5"


def head_fitting(classifier: keras.Model, train: LoadedImages, val: LoadedImages,
                 config: TrainConfig) -> Fitting:
    """Phase 1 on cached backbone features: one forward pass per image and view, then the
    head alone (its layers are the classifier's own) trains on them; every epoch sees the image
    and its ``head_views`` augmented views."""
    cache = FeatureCache(config.feature_cache)
    key = model_key(classifier, config.augment if config.head_views else None, config.seed)
    views = [cache.features(classifier, train.images, view, config.augment, config.seed,
                            config.batch_size, key) for view in range(config.head_views + 1)]
    val_features = cache.features(classifier, val.images, 0, key=key)
    log.info("phase 1 on cached features: %d images x %d view(s); cache hits %d, misses %d",
             len(train.records), len(views), cache.hits, cache.misses)
    weights = loss_weights(train, config)
    targets = fit_targets(train, config)
    batches = ViewBatches([np.concatenate(views)],
                          np.tile(targets, (len(views),) + (1,) * (targets.ndim - 1)),
                          config.batch_size, config.seed,
                          None if weights is None else np.tile(weights, len(views)))
    return Fitting(head_model(classifier), batches, (val_features, fit_targets(val, config)))


def top_fitting(split: TrunkSplit, train: LoadedImages, val: LoadedImages, config: TrainConfig,
                epochs: int) -> Fitting:
    """Phase 2 of a pretrained backbone on its frozen trunk's output, computed once per image
    and view: only the unfrozen stages and the head run each epoch. With source-cue
    augmentation, epoch e trains on the e-th augmented view of every image."""
    cache = FeatureCache(config.feature_cache)
    augment = SourceAugment() if config.source_augment else None
    views = [cache.trunk_views(split, train.images, view, augment, config.seed,
                               config.batch_size)
             for view in (range(1, epochs + 1) if augment else [0])]
    val_outputs = cache.trunk_views(split, val.images, batch_size=config.batch_size)
    log.info("phase 2 on the frozen trunk's output: %d images x %d view(s); cache hits %d, "
             "misses %d", len(train.records), len(views), cache.hits, cache.misses)
    return Fitting(split.top, ViewBatches(views, fit_targets(train, config), config.batch_size,
                                          config.seed, loss_weights(train, config)),
                   (val_outputs, fit_targets(val, config)))


def full_fitting(classifier: keras.Model, train: LoadedImages, val: LoadedImages,
                 config: TrainConfig, segmenter=None) -> Fitting:
    """Images through the whole network (with its augmentation layers), read from memory or,
    with ``stream``, from the files by worker threads (``segmenter``: for a lung crop);
    source-cue augmentation on the way."""
    augment = SourceAugment() if config.source_augment else None
    items = [r.path for r in train.records] if config.stream else train.images
    batches = ImageSequence(items, fit_targets(train, config), config.preprocessing,
                            config.batch_size,
                            shuffle=True, seed=config.seed, cache_dir=config.image_cache,
                            workers=config.workers, augment=augment,
                            sample_weights=loss_weights(train, config), segmenter=segmenter)
    return Fitting(classifier, batches, (val.images[..., None], fit_targets(val, config)))


def fit_phase(fitting: Fitting, phase: Phase, *, classifier: keras.Model, config: TrainConfig,
              run: Path, best_so_far: Best, verbose, callbacks: tuple = ()) -> Best:
    """Fit ``phase``, continuing from its checkpoint when it has one; returns the best
    selection score over this phase and the ones before, and where it was reached."""
    state_file = RunFolder(run).checkpoints_folder / f"phase{phase.number}.npz"
    steps = len(fitting.batches)
    _compile(fitting.model, phase.learning_rate, config.schedule, phase.epochs * steps,
             class_count(config), positive_column(config))
    checkpoint = EpochCheckpoint(state_file, best_weights_file(run), classifier,
                                 phase.epochs, config.patience, best_so_far, phase.number)
    start = checkpoint.restore(fitting.model)
    if checkpoint.done:
        return checkpoint.best
    _drop_history(RunFolder(run).history_file, phase.number, start)  # epochs that were not kept
    fitting.batches.epoch = start
    # data parallel: every batch must split over the devices, the validation split's last
    # one too; its score is computed from a padded prediction instead of Keras' validation
    split = data_parallel_devices() > 1
    scorer = [ValidationScore(*fitting.validation, positive_column(config),
                              fitting.batches.batch_size)] if split else []
    # shuffle=False: Keras would reorder the batches from Python's global random state; the
    # batches shuffle themselves from the seed and the epoch
    fitting.model.fit(fitting.batches, validation_data=None if split else fitting.validation,
                      validation_batch_size=fitting.batches.batch_size, epochs=phase.epochs,
                      initial_epoch=start, shuffle=False, verbose=verbose,
                      callbacks=[*scorer, _PhaseColumn(phase.number),
                                 keras.callbacks.CSVLogger(str(RunFolder(run).history_file),
                                                           append=True), checkpoint,
                                 *callbacks])
    return checkpoint.best


class ValidationScore(keras.callbacks.Callback):
    """``val_auc``, the validation ROC-AUC of P(positive), from ``predict_padded`` (any number
    of images splits over the devices; Keras' own validation would need a multiple of them,
    and counts copies added to make one as films)."""

    def __init__(self, inputs: np.ndarray, targets: np.ndarray, positive: int, batch_size: int):
        super().__init__()
        self.inputs, self.batch_size = inputs, batch_size
        self.targets = targets[:, positive] if targets.ndim > 1 else targets
        self.positive = positive

    def on_epoch_end(self, epoch, logs=None):
        out = np.asarray(predict_padded(self.model, self.inputs, self.batch_size), np.float32)
        scores = out[:, self.positive] if out.shape[1] > 1 else out.ravel()
        if logs is not None:
            logs["val_auc"] = roc_auc(self.targets, scores)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the classifier's weights when validation ROC-AUC improved over every
    epoch so far (of this phase and those before), then (one atomic file) the fitted model's
    variables, the optimizer's, the best score and where it was reached, and the
    early-stopping count; stops after ``patience`` epochs without improvement."""

    def __init__(self, state_file: Path, best_file: Path, classifier: keras.Model, epochs: int,
                 patience: int, best: Best, phase: int = 1):
        super().__init__()
        self.state_file, self.best_file, self.classifier = state_file, best_file, classifier
        self.epochs, self.patience, self.phase = epochs, patience, phase
        self.best, self.wait, self.done = dataclasses.replace(best, per_phase=dict(
            best.per_phase)), 0, False

    def restore(self, model: keras.Model) -> int:
        """Load the saved state into ``model`` (compiled); the epoch to start from."""
        if not self.state_file.is_file():
            return 0
        with np.load(self.state_file) as saved:
            state = json.loads(str(saved["state"]))
            if not state["done"]:  # a finished phase keeps its score, not its variables
                model.optimizer.build(model.trainable_variables)
                for prefix, variables in (("v", model.variables),
                                          ("o", model.optimizer.variables)):
                    for index, variable in enumerate(variables):
                        variable.assign(saved[f"{prefix}{index}"])
        self.best = Best.from_state(state["best"])
        self.wait, self.done = state["wait"], state["done"]
        log.info("resuming after epoch %d (best selection ROC-AUC so far %s)", state["epoch"],
                 "none" if self.best.score is None else f"{self.best.score:.4f}")
        return state["epoch"] + 1

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get("val_auc")
        scored = score is not None and np.isfinite(score)
        if scored and score > self.best.per_phase.get(self.phase, -np.inf):
            self.best.per_phase[self.phase] = float(score)
        if scored and (self.best.score is None or score > self.best.score):
            self.best.score, self.best.phase, self.best.epoch = float(score), self.phase, epoch
            self.wait = 0
            with atomic_path(self.best_file, suffix=".weights.h5",
                             expected_bytes=weights_bytes(self.classifier.weights)) as tmp:
                self.classifier.save_weights(tmp)
        else:
            self.wait += 1
        self.done = self.wait >= self.patience or epoch + 1 >= self.epochs
        self.model.stop_training = self.model.stop_training or self.done
        state = {"epoch": epoch, "best": dataclasses.asdict(self.best), "wait": self.wait,
                 "done": self.done}
        arrays = {}
        if not self.done:  # what the next epoch needs; a finished phase needs none of it
            arrays = {f"v{i}": keras.ops.convert_to_numpy(v)
                      for i, v in enumerate(self.model.variables)}
            arrays.update({f"o{i}": keras.ops.convert_to_numpy(v)
                           for i, v in enumerate(self.model.optimizer.variables)})
        with atomic_path(self.state_file, suffix=".npz", expected_bytes=sum(
                a.nbytes for a in arrays.values())) as tmp:
            np.savez(tmp, state=np.array(json.dumps(state)), **arrays)


def weights_bytes(weights) -> int:
    """What saving these variables takes, about (float32 or their own size)."""
    return sum(int(np.prod(w.shape)) * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
               for w in weights)


class _PhaseColumn(keras.callbacks.Callback):
    """Adds the phase number to the epoch logs, so history.csv tells the phases apart."""

    def __init__(self, phase: int):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["phase"] = self.phase


def _drop_history(history: Path, phase: int, from_epoch: int) -> None:
    """Remove ``phase``'s rows of epochs ``from_epoch`` and later from ``history.csv``: epochs
    an interrupted attempt logged but whose state was not kept are run again."""
    if not history.is_file():
        return
    with open(history, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "phase" not in rows[0]:
        return
    kept = [row for row in rows
            if float(row["phase"]) != phase or int(row["epoch"]) < from_epoch]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    write_text_atomic(history, buffer.getvalue())


def learning_rate_schedule(learning_rate: float, schedule: str, total_steps: int):
    """``constant``: ``learning_rate`` throughout. ``cosine``: a linear warm-up from a tenth of
    it over the first tenth of the steps (Adam's first steps on a random network are the
    unstable ones), then a cosine decay to zero at ``total_steps``."""
    if schedule == "constant":
        return learning_rate
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    warmup = max(1, total_steps // 10)
    return keras.optimizers.schedules.CosineDecay(
        learning_rate / 10, decay_steps=max(1, total_steps - warmup),
        warmup_target=learning_rate, warmup_steps=warmup)


def _compile(model: keras.Model, learning_rate: float, schedule: str = "constant",
             total_steps: int = 1, classes: int = 2, positive: int = 0) -> None:
    """Binary cross-entropy on one sigmoid unit, or categorical on a softmax head; the
    ROC-AUC that selects epochs is P(positive)'s either way."""
    rate = learning_rate_schedule(learning_rate, schedule, total_steps)
    if classes == 2:
        loss, metrics = keras.losses.BinaryCrossentropy(), [
            keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")]
    else:
        loss, metrics = keras.losses.CategoricalCrossentropy(), [
            keras.metrics.AUC(name="auc", multi_label=True, num_labels=classes,
                              label_weights=[float(i == positive) for i in range(classes)]),
            keras.metrics.CategoricalAccuracy(name="accuracy")]
    if keras.backend.backend() == "jax":
        _compiled_on_jax(model)
    model.compile(optimizer=keras.optimizers.Adam(rate), loss=loss, metrics=metrics)


# Keras marks these unfit for XLA (for TensorFlow's image transform); on jax they compile (and a
# model with any of them otherwise trains op by op: several times slower, and under data parallelism
# each op a collective of its own, which deadlocked two devices on a ResNet50)
JAX_COMPILABLE = ("RandomRotation", "RandomZoom", "RandomTranslation")


def _compiled_on_jax(model: keras.Model) -> None:
    """Let ``model``'s random rotation, zoom and translation layers be compiled by XLA on jax."""
    for layer in model._flatten_layers():
        if type(layer).__name__ in JAX_COMPILABLE:
            layer.supports_jit = True


def class_count(config: TrainConfig) -> int:
    """The classes the head tells apart (2: one sigmoid unit)."""
    return len(config.classes) if config.classes else 2


def positive_column(config: TrainConfig) -> int:
    """The positive class's output of a softmax head (0 for one sigmoid unit)."""
    if not config.classes:
        return 0
    wanted = (config.positive_class or "covid").lower()
    names = [c.lower() for c in config.classes]
    matches = [i for i, name in enumerate(names) if name == wanted or (
        config.positive_class is None and "covid" in name and not name.startswith("non"))]
    if not matches:
        raise DataError(f"the classes {config.classes} do not include the positive class "
                         f"({config.positive_class or 'COVID'})")
    return matches[0]


def class_indices(images: LoadedImages, config: TrainConfig) -> np.ndarray:
    """Each image's class among ``config.classes`` (its label, case aside)."""
    index = {c.lower(): i for i, c in enumerate(config.classes)}
    unknown = sorted({r.label for r in images.records if r.label.lower() not in index})
    if unknown:
        raise DataError(f"labels {unknown} are none of the classes {list(config.classes)}: "
                         f"name every class (--classes), or relabel those images")
    return np.array([index[r.label.lower()] for r in images.records], dtype=int)


def fit_targets(images: LoadedImages, config: TrainConfig) -> np.ndarray:
    """What the head learns: P(positive) targets (n,), or one-hot classes (n, classes)."""
    if not config.classes:
        return images.targets
    return np.eye(len(config.classes), dtype=np.float32)[class_indices(images, config)]


def loss_weights(images: LoadedImages, config: TrainConfig) -> np.ndarray | None:
    """Each training image's weight in the loss, mean 1 (None: all equal). ``class_weights``:
    each class weighs the same in total. ``source_balance`` instead: within each source, its
    classes share the source's weight equally (a source keeps its size; a single-class source
    cannot be balanced and keeps its one class)."""
    from collections import Counter
    if not config.class_weights:
        return None
    targets = class_indices(images, config) if config.classes else images.targets.astype(int)
    if config.source_balance:
        cells = Counter((r.source, t) for r, t in zip(images.records, targets))
        per_source = Counter(r.source for r in images.records)
        classes = Counter(source for source, _ in cells)
        weights = np.array([per_source[r.source] / classes[r.source] / cells[(r.source, t)]
                            for r, t in zip(images.records, targets)])
    else:
        counts = np.bincount(targets, minlength=class_count(config))
        weights = targets.size / (len(counts) * counts[targets])
    return (weights / weights.mean()).astype(np.float32)
