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

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from covidxray.config import TrainConfig
from covidxray.data.dataset import LoadedImages
from covidxray.fileutil import atomic_path, write_text_atomic
from covidxray.pixels.transforms import SourceAugment
from covidxray.training.features import FeatureCache, TrunkSplit, head_model, model_key
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
class Fitting:
    """What one phase fits: a model sharing the classifier's layers, its batches (a
    ``PyDataset`` whose ``epoch`` decides what it serves) and the validation arrays."""

    model: keras.Model
    batches: keras.utils.PyDataset
    validation: tuple[np.ndarray, np.ndarray]


def checkpoint_folder(run: Path) -> Path:
    return run / ".checkpoints"


def best_weights_file(run: Path) -> Path:
    """The classifier's weights at its best validation ROC-AUC so far, over both phases."""
    return checkpoint_folder(run) / "best.weights.h5"


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
    batches = ViewBatches([np.concatenate(views)], np.tile(train.targets, len(views)),
                          config.batch_size, config.seed,
                          None if weights is None else np.tile(weights, len(views)))
    return Fitting(head_model(classifier), batches, (val_features, val.targets))


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
    return Fitting(split.top, ViewBatches(views, train.targets, config.batch_size, config.seed,
                                          loss_weights(train, config)),
                   (val_outputs, val.targets))


def full_fitting(classifier: keras.Model, train: LoadedImages, val: LoadedImages,
                 config: TrainConfig) -> Fitting:
    """Images through the whole network (with its augmentation layers), read from memory or,
    with ``stream``, from the files by worker threads; source-cue augmentation on the way."""
    augment = SourceAugment() if config.source_augment else None
    items = [r.path for r in train.records] if config.stream else train.images
    batches = ImageSequence(items, train.targets, config.preprocessing, config.batch_size,
                            shuffle=True, seed=config.seed, cache_dir=config.image_cache,
                            workers=config.workers, augment=augment,
                            sample_weights=loss_weights(train, config))
    return Fitting(classifier, batches, (val.images[..., None], val.targets))


def fit_phase(fitting: Fitting, phase: Phase, *, classifier: keras.Model, config: TrainConfig,
              run: Path, best_so_far: float | None, verbose, callbacks: tuple = ()
              ) -> float | None:
    """Fit ``phase``, continuing from its checkpoint when it has one; returns the best
    validation ROC-AUC over this phase and the ones before (None: no epoch was scored)."""
    state_file = checkpoint_folder(run) / f"phase{phase.number}.npz"
    steps = len(fitting.batches)
    _compile(fitting.model, phase.learning_rate, config.schedule, phase.epochs * steps)
    checkpoint = EpochCheckpoint(state_file, best_weights_file(run), classifier,
                                 phase.epochs, config.patience, best_so_far)
    start = checkpoint.restore(fitting.model)
    if checkpoint.done:
        return checkpoint.best
    _drop_history(run / "history.csv", phase.number, start)  # epochs that were not kept
    fitting.batches.epoch = start
    # shuffle=False: Keras would reorder the batches from Python's global random state; the
    # batches shuffle themselves from the seed and the epoch
    fitting.model.fit(fitting.batches, validation_data=fitting.validation, epochs=phase.epochs,
                      initial_epoch=start, shuffle=False, verbose=verbose,
                      callbacks=[_PhaseColumn(phase.number),
                                 keras.callbacks.CSVLogger(str(run / "history.csv"),
                                                           append=True), checkpoint,
                                 *callbacks])
    return checkpoint.best


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: the classifier's weights when validation ROC-AUC improved, then
    (one atomic file) the fitted model's variables, the optimizer's, the best score and the
    early-stopping count; stops after ``patience`` epochs without improvement."""

    def __init__(self, state_file: Path, best_file: Path, classifier: keras.Model, epochs: int,
                 patience: int, best: float | None):
        super().__init__()
        self.state_file, self.best_file, self.classifier = state_file, best_file, classifier
        self.epochs, self.patience = epochs, patience
        self.best, self.wait, self.done = best, 0, False

    def restore(self, model: keras.Model) -> int:
        """Load the saved state into ``model`` (compiled); the epoch to start from."""
        if not self.state_file.is_file():
            return 0
        with np.load(self.state_file) as saved:
            state = json.loads(str(saved["state"]))
            model.optimizer.build(model.trainable_variables)
            for prefix, variables in (("v", model.variables), ("o", model.optimizer.variables)):
                for index, variable in enumerate(variables):
                    variable.assign(saved[f"{prefix}{index}"])
        self.best, self.wait, self.done = state["best"], state["wait"], state["done"]
        log.info("resuming after epoch %d (best validation ROC-AUC so far %s)", state["epoch"],
                 "none" if self.best is None else f"{self.best:.4f}")
        return state["epoch"] + 1

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get("val_auc")
        if score is not None and np.isfinite(score) and (self.best is None or score > self.best):
            self.best, self.wait = float(score), 0
            with atomic_path(self.best_file, suffix=".weights.h5") as tmp:
                self.classifier.save_weights(tmp)
        else:
            self.wait += 1
        self.done = self.wait >= self.patience or epoch + 1 >= self.epochs
        self.model.stop_training = self.model.stop_training or self.done
        state = {"epoch": epoch, "best": self.best, "wait": self.wait, "done": self.done}
        arrays = {f"v{i}": keras.ops.convert_to_numpy(v)
                  for i, v in enumerate(self.model.variables)}
        arrays.update({f"o{i}": keras.ops.convert_to_numpy(v)
                       for i, v in enumerate(self.model.optimizer.variables)})
        with atomic_path(self.state_file, suffix=".npz") as tmp:
            np.savez(tmp, state=np.array(json.dumps(state)), **arrays)


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
             total_steps: int = 1) -> None:
    rate = learning_rate_schedule(learning_rate, schedule, total_steps)
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[keras.metrics.AUC(name="auc"),
                           keras.metrics.BinaryAccuracy(name="accuracy")])


def loss_weights(images: LoadedImages, config: TrainConfig) -> np.ndarray | None:
    """Each training image's weight in the loss, mean 1 (None: all equal). ``class_weights``:
    each class weighs the same in total. ``source_balance`` instead: within each source, its
    classes share the source's weight equally (a source keeps its size; a single-class source
    cannot be balanced and keeps its one class)."""
    from collections import Counter
    if not config.class_weights:
        return None
    targets = images.targets.astype(int)
    if config.source_balance:
        cells = Counter((r.source, t) for r, t in zip(images.records, targets))
        per_source = Counter(r.source for r in images.records)
        classes = Counter(source for source, _ in cells)
        weights = np.array([per_source[r.source] / classes[r.source] / cells[(r.source, t)]
                            for r, t in zip(images.records, targets)])
    else:
        weights = targets.size / (2 * np.bincount(targets, minlength=2)[targets])
    return (weights / weights.mean()).astype(np.float32)
