"""Train the classifier in two phases and write the run folder.

Phase 1 trains the head on a frozen backbone; phase 2 unfreezes the top stage(s) at a lower
learning rate. Both keep the best weights by validation ROC-AUC, stop early, log to
``history.csv`` and can be resumed. The threshold is then frozen on the validation split.
"""

from __future__ import annotations

import csv
import datetime
import functools
import hashlib
import io
import json
import logging
import math
import platform
import shutil
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

import keras
import numpy as np

from covidxray import __version__
from covidxray.config import TrainConfig
from covidxray.data.audit import exact_duplicates_across_splits, select_sources
from covidxray.data.dataset import (
    DataError,
    Dataset,
    LoadedImages,
    discover,
    file_hashes,
    fingerprint,
    load_images,
    with_splits,
)
from covidxray.data.split import (
    assign_splits,
    patients_across_splits,
    read_split_csv,
    write_split_csv,
)
from covidxray.evaluation.metrics import (
    apply_temperature,
    binary_metrics,
    choose_threshold,
    fit_temperature,
)
from covidxray.fileutil import atomic_path, write_json_atomic, write_text_atomic
from covidxray.model.accelerator import precision_for_hardware
from covidxray.model.network import (
    Forward,
    build_model,
    feature_extractor,
    forward,
    get_backbone,
    predict_scores,
    stage_prefixes,
    unfreeze_top_stages,
)
from covidxray.pixels.transforms import SourceAugment, mean_over_views
from covidxray.run.metadata import METADATA_FILE, RunMetadata
from covidxray.run.ood import OOD_FILE, OODGate
from covidxray.training.features import FeatureCache, TrunkSplit, head_model, model_key, trunk_split
from covidxray.training.pipeline import ImageSequence, ViewBatches

log = logging.getLogger(__name__)

PHASES = {1: "head", 2: "finetune"}


class RunExistsError(FileExistsError):
    """The output folder already holds a run; resume it or choose another folder."""


def train(config: TrainConfig, resume: bool = False, verbose: int | str = "auto") -> Path:
    """Train a model as ``config`` says and write ``config.out``; returns the run folder.

    With ``resume``, an interrupted run in ``config.out`` continues from its last finished epoch
    (its saved ``config.json`` is used).
    """
    run = Path(config.out)
    if resume:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"{run}: no config.json to resume from")
        if (run / "model.keras").is_file():
            raise RunExistsError(f"{run}: this run is already complete")
        config = TrainConfig.load(run / "config.json")
        if (run / "split.csv").is_file():  # the split the interrupted run trained on
            config.split_file = str(run / "split.csv")
    elif (run / "config.json").exists():
        raise RunExistsError(f"{run} already holds a run: use --resume to continue it, or "
                             f"another --out")
    run.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)

    dataset, records, hashes = prepare_splits(config, run)
    config.save(run / "config.json")
    train_images = _load_split(records, "train", config)
    val_images = _load_split(records, "val", config)

    with precision_for_hardware(config.mixed_precision) as policy:
        model = build_model(config.image_size, config.backbone, config.weights, config.dropout,
                            config.augment, config.seed)
        _train_phases(model, config, run, train_images, val_images, resume, verbose)
        finalize_run(model, config, dataset, records, hashes, train_images, val_images, run,
                     policy)
    shutil.rmtree(run / ".checkpoints", ignore_errors=True)
    return run


def _train_phases(model, config: TrainConfig, run: Path, train_images: LoadedImages,
                  val_images: LoadedImages, resume: bool, verbose) -> None:
    """Phase 1 (head, frozen backbone) then phase 2 (top stages); the model ends with the
    weights of its best validation epoch. Finished phases of a resumed run are skipped."""
    state_file = run / ".checkpoints" / "state.json"
    state = json.loads(state_file.read_text()) if resume and state_file.exists() else {}
    best_weights = _best_weights_file(run)
    for phase, epochs in ((1, config.head_epochs), (2, config.finetune_epochs)):
        if epochs == 0 or phase in state.get("phases_done", []):
            continue
        if phase == 2:
            if best_weights.exists():
                model.load_weights(best_weights)
            unfreeze_top_stages(model, config.backbone, config.unfreeze_stages,
                                freeze_batchnorm=config.weights.lower() != "none")
        learning_rate = config.head_learning_rate if phase == 1 else config.finetune_learning_rate
        log.info("phase %d (%s): %d epochs at learning rate %g", phase, PHASES[phase], epochs,
                 learning_rate)
        fit = _fit_head_on_features if phase == 1 and config.cached_head else _fit_phase
        if phase == 2 and _trunk_is_frozen(config):
            split = trunk_split(model, stage_prefixes(config.backbone, config.unfreeze_stages))
            if split is not None:
                fit = functools.partial(_fit_top_on_trunk, split=split)
        best = fit(model, phase, epochs, learning_rate, train_images, val_images, config, run,
                   state.get("best_val_auc"), verbose)
        state = {"phases_done": state.get("phases_done", []) + [phase],
                 "best_val_auc": best if best is not None else state.get("best_val_auc")}
        write_json_atomic(state_file, state)
    if best_weights.exists():
        with warnings.catch_warnings():  # the saved optimizer state is of no use from here on
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(best_weights)


def finalize_run(model, config: TrainConfig, dataset: Dataset, records, hashes: dict[str, str],
                 train_images: LoadedImages, val_images: LoadedImages, run: Path,
                 dtype_policy: str = "float32") -> None:
    """Freeze the threshold on validation, fit the OOD gate, write metadata and the model."""
    extractor = feature_extractor(model)
    # one pass over validation gives the gate its embeddings and the threshold its plain view
    val_forward = forward(model, val_images.images, config.batch_size, extractor)
    val_scores = mean_over_views(lambda x: predict_scores(model, x, config.batch_size),
                                 val_images.images, config.test_time_views,
                                 first=val_forward.scores)
    temperature = None
    if config.calibrate:
        temperature = fit_temperature(val_images.targets, val_scores)
        val_scores = apply_temperature(val_scores, temperature)
        log.info("temperature scaling: T = %.3f (fitted on validation)", temperature)
    threshold = choose_threshold(val_images.targets, val_scores, config.threshold_method,
                                 config.target_sensitivity)
    val_metrics = binary_metrics(val_images.targets, val_scores, threshold)
    log.info("validation ROC-AUC %.3f; threshold %.4f (%s)", val_metrics["roc_auc"], threshold,
             config.threshold_method)
    split_counts = {split: dict(Counter(r.label for r in records if r.split == split))
                    for split in ("train", "val", "test")}
    metadata = RunMetadata(
        class_names=dataset.class_names, positive_class=dataset.positive_class,
        preprocessing=config.preprocessing, backbone=get_backbone(config.backbone).name,
        weights=config.weights, threshold=threshold, threshold_method=config.threshold_method,
        target_sensitivity=(config.target_sensitivity
                            if config.threshold_method == "sensitivity" else None),
        temperature=temperature, test_time_views=config.test_time_views,
        model_id=model_id(model, config), validation_metrics=val_metrics,
        split_counts=split_counts,
        unreadable_training_files=len(train_images.failures) + len(val_images.failures),
        data_fingerprint=fingerprint([r for r in records if r.split in ("train", "val")],
                                     hashes),
        data_root=str(Path(dataset.root).resolve()), sources_left_out=dataset.sources_left_out,
        synthetic_data=dataset.synthetic, dtype_policy=dtype_policy,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        covidxray_version=__version__, backend=keras.backend.backend(),
        versions=library_versions())
    train_forward = forward(model, train_images.images, config.batch_size, extractor)
    fit_ood_gate(train_forward, train_images, val_forward, val_images).save(run / OOD_FILE)
    metadata.save(run / METADATA_FILE)
    save_model_atomic(model, run / "model.keras")  # last: the run is complete once it exists


def model_id(model: keras.Model, config: TrainConfig) -> str:
    """Backbone, image size and the first 12 hex digits of the sha256 of the weights: two runs
    share an id only if they share every weight."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return f"{get_backbone(config.backbone).name}-{config.image_size}px-{digest.hexdigest()[:12]}"


def fit_ood_gate(train: Forward, train_images: LoadedImages, val: Forward,
                 val_images: LoadedImages) -> OODGate:
    """The out-of-distribution gate of a model, fitted on its passes over its own training
    and validation images."""
    if len(val_images.records) < 50:
        log.warning("the out-of-distribution gate's thresholds come from %d validation images: "
                    "with so few they are rough, and some X-rays like the training ones will "
                    "be flagged", len(val_images.records))
    return OODGate.fit(train.embeddings, train_images.images, val.embeddings, val_images.images)


def refit_ood_gate(run_dir: str | Path, batch_size: int = 32) -> OODGate:
    """Fit a run's gate again from its own ``split.csv`` (a run from an older version)."""
    from covidxray.data.split import read_split_records
    from covidxray.run.predictor import Predictor
    run_dir = Path(run_dir)
    predictor = Predictor.load(run_dir)
    records = read_split_records(run_dir / "split.csv", predictor.positive_class)
    split = {name: load_images([r for r in records if r.split == name], predictor.preprocessing)
             for name in ("train", "val")}
    passes = {name: forward(predictor.model, images.images, batch_size, predictor.extractor)
              for name, images in split.items()}
    gate = fit_ood_gate(passes["train"], split["train"], passes["val"], split["val"])
    gate.save(run_dir / OOD_FILE)
    return gate


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save weights and architecture without the optimizer state (a third of the size).

    A new, uncompiled functional model over the same layers carries no optimizer (a clone
    would be compiled again, and its optimizer variables saved).
    """
    inference_model = keras.Model(model.inputs, model.outputs, name=model.name)
    with atomic_path(path, suffix=".keras") as tmp:
        inference_model.save(tmp)


def prepare_splits(config: TrainConfig, run: Path) -> tuple[Dataset, list, dict[str, str]]:
    """Discover the data, give every image a split and write ``RUN/split.csv``; also returns
    every file's sha256 (read once, for the duplicate check and the data fingerprint)."""
    dataset = discover(config.data, config.positive_class, config.source_from_prefix)
    for path, reason in dataset.skipped:
        log.warning("skipped %s: %s", path, reason)
    kept, left_out = select_sources(dataset.records, config.sources, config.exclude_sources,
                                    config.exclude_confounded)
    for source, reason in left_out.items():
        log.warning("source %s left out of training: %s", source, reason)
    dataset = replace(dataset, records=kept, sources_left_out=left_out)
    if config.split_file:
        records = with_splits(dataset.records, read_split_csv(config.split_file))
        if not records:
            raise DataError(f"{config.split_file}: none of its paths are in {config.data}")
    else:
        records = assign_splits(dataset.records, config.split_fractions, config.seed)
    leaks = patients_across_splits(records)
    if leaks:
        example = ", ".join(f"{p} in {'/'.join(s)}" for p, s in list(leaks.items())[:3])
        raise DataError(f"{len(leaks)} patients appear in more than one split ({example}); "
                        f"fix the split so that no patient crosses splits")
    hashes = file_hashes(records)
    duplicates = exact_duplicates_across_splits(records, hashes)
    if duplicates:
        example = "; ".join(" = ".join(d["paths"][:2]) for d in duplicates[:2])
        message = (f"{len(duplicates)} identical files sit in more than one split ({example}); "
                   f"'covidxray audit' lists them all")
        if not config.allow_leaks:
            raise DataError(message + "; remove them, or pass --allow-leaks to train anyway")
        log.warning("%s (trained anyway: --allow-leaks)", message)
    write_split_csv(run / "split.csv", records)
    counts = Counter((r.split, r.label) for r in records)
    log.info("split: %s", ", ".join(f"{s}/{c}={n}" for (s, c), n in sorted(counts.items())))
    return dataset, records, hashes


def _load_split(records, split: str, config: TrainConfig) -> LoadedImages:
    loaded = load_images([r for r in records if r.split == split], config.preprocessing,
                         config.strict)
    for error in loaded.failures:
        log.warning("skipped %s: %s", error.path, error.reason)
    present = set(loaded.targets.astype(int).tolist())
    if present != {0, 1}:
        raise DataError(f"the {split} split needs images of both classes; it has "
                        f"{len(loaded.records)} readable images of classes {sorted(present)}")
    return loaded


class _PhaseColumn(keras.callbacks.Callback):
    """Adds the phase number to the epoch logs, so history.csv tells the phases apart."""

    def __init__(self, phase: int):
        super().__init__()
        self.phase = phase

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["phase"] = self.phase


def _best_weights_file(run: Path) -> Path:
    return run / ".checkpoints" / "best.weights.h5"


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


def _compile(model, learning_rate: float, schedule: str = "constant",
             total_steps: int = 1) -> None:
    rate = learning_rate_schedule(learning_rate, schedule, total_steps)
    model.compile(optimizer=keras.optimizers.Adam(rate),
                  loss=keras.losses.BinaryCrossentropy(),
                  metrics=[keras.metrics.AUC(name="auc"),
                           keras.metrics.BinaryAccuracy(name="accuracy")])


def _fit_head_on_features(model, phase, epochs, learning_rate, train_images, val_images,
                          config, run, best_so_far, verbose) -> float | None:
    """Phase 1 on cached backbone features: one forward pass per image and view, then the
    head alone (its layers are the model's own) trains for ``epochs`` on them."""
    cache = FeatureCache(config.feature_cache)
    key = model_key(model, config.augment if config.head_views else None, config.seed)
    views = [cache.features(model, train_images.images, view, config.augment, config.seed,
                            config.batch_size, key) for view in range(config.head_views + 1)]
    val_features = cache.features(model, val_images.images, 0, key=key)
    log.info("phase 1 on cached features: %d images x %d view(s); cache hits %d, misses %d",
             len(train_images.records), len(views), cache.hits, cache.misses)
    _drop_history_of_phase(run / "history.csv", phase)  # an interrupted attempt's epochs
    head = head_model(model)
    _compile(head, learning_rate, config.schedule,
             epochs * math.ceil(len(views) * len(train_images.records) / config.batch_size))
    stopping = keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                             patience=config.patience,
                                             restore_best_weights=True)
    weights = loss_weights(train_images, config)
    history = head.fit(
        np.concatenate(views), np.tile(train_images.targets, len(views)),
        validation_data=(val_features, val_images.targets), epochs=epochs,
        batch_size=config.batch_size, shuffle=True,
        sample_weight=None if weights is None else np.tile(weights, len(views)),
        callbacks=[_PhaseColumn(phase), keras.callbacks.CSVLogger(str(run / "history.csv"),
                                                                  append=True), stopping],
        verbose=verbose)
    best = float(max(history.history["val_auc"]))
    if best_so_far is None or best > best_so_far:  # the head now holds its best epoch
        _best_weights_file(run).parent.mkdir(parents=True, exist_ok=True)
        model.save_weights(_best_weights_file(run))
        return best
    return best_so_far


def _trunk_is_frozen(config: TrainConfig) -> bool:
    """Whether phase 2 leaves a trunk that never changes: pretrained (BatchNorm in inference
    mode), some stages kept frozen, and the cached path asked for."""
    return (config.cached_trunk and config.weights.lower() != "none"
            and config.unfreeze_stages != "all")


def _fit_top_on_trunk(model, phase, epochs, learning_rate, train_images, val_images, config,
                      run, best_so_far, verbose, split: TrunkSplit) -> float | None:
    """Phase 2 of a pretrained backbone on its frozen trunk's output, computed once per image
    and view: only the unfrozen stages and the head run each epoch. With source-cue
    augmentation, epoch e trains on the e-th augmented view of every image."""
    cache = FeatureCache(config.feature_cache)
    augment = SourceAugment() if config.source_augment else None
    views = [cache.trunk_views(split, train_images.images, view, augment, config.seed,
                               config.batch_size)
             for view in (range(1, epochs + 1) if augment else [0])]
    val_outputs = cache.trunk_views(split, val_images.images, batch_size=config.batch_size)
    log.info("phase 2 on the frozen trunk's output: %d images x %d view(s); cache hits %d, "
             "misses %d", len(train_images.records), len(views), cache.hits, cache.misses)
    _drop_history_of_phase(run / "history.csv", phase)  # an interrupted attempt's epochs
    _compile(split.top, learning_rate, config.schedule,
             epochs * math.ceil(len(train_images.records) / config.batch_size))
    top_best = run / ".checkpoints" / "best-top.weights.h5"
    top_best.unlink(missing_ok=True)
    checkpoint = keras.callbacks.ModelCheckpoint(
        top_best, monitor="val_auc", mode="max", save_best_only=True, save_weights_only=True,
        initial_value_threshold=best_so_far)
    split.top.fit(
        ViewBatches(views, train_images.targets, config.batch_size, config.seed,
                    loss_weights(train_images, config)),
        validation_data=(val_outputs, val_images.targets), epochs=epochs,
        callbacks=[_PhaseColumn(phase), keras.callbacks.CSVLogger(str(run / "history.csv"),
                                                                  append=True), checkpoint,
                   keras.callbacks.EarlyStopping(monitor="val_auc", mode="max",
                                                 patience=config.patience)],
        verbose=verbose)
    if not top_best.is_file():  # no epoch beat the best so far
        return best_so_far
    split.top.load_weights(top_best)  # its layers are the classifier's
    model.save_weights(_best_weights_file(run))
    return float(checkpoint.best)


def _drop_history_of_phase(history: Path, phase: int) -> None:
    """Remove ``phase``'s rows from ``history.csv``: a phase that is run again from its start
    (the cached head phase of a resumed run) must not leave the epochs of its first attempt."""
    if not history.is_file():
        return
    with open(history, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "phase" not in rows[0]:
        return
    kept = [row for row in rows if float(row["phase"]) != phase]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept)
    write_text_atomic(history, buffer.getvalue())


def _fit_phase(model, phase, epochs, learning_rate, train_images, val_images, config, run,
               best_so_far, verbose) -> float | None:
    _compile(model, learning_rate, config.schedule,
             epochs * math.ceil(len(train_images.records) / config.batch_size))
    checkpoint = keras.callbacks.ModelCheckpoint(
        _best_weights_file(run), monitor="val_auc", mode="max",
        save_best_only=True, save_weights_only=True, initial_value_threshold=best_so_far)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run / ".checkpoints" / f"backup-phase{phase}")),
        _PhaseColumn(phase),
        keras.callbacks.CSVLogger(str(run / "history.csv"), append=True),
        checkpoint,
        keras.callbacks.EarlyStopping(monitor="val_auc", mode="max", patience=config.patience),
    ]
    weights = loss_weights(train_images, config)
    if config.stream or config.source_augment:  # batches made by worker threads
        augment = SourceAugment() if config.source_augment else None
        items = [r.path for r in train_images.records] if config.stream else train_images.images
        train_data = dict(x=ImageSequence(items, train_images.targets, config.preprocessing,
                                          config.batch_size, shuffle=True, seed=config.seed,
                                          cache_dir=config.image_cache, workers=config.workers,
                                          augment=augment, sample_weights=weights))
    else:
        train_data = dict(x=train_images.images[..., None], y=train_images.targets,
                          sample_weight=weights, batch_size=config.batch_size, shuffle=True)
    model.fit(**train_data,
              validation_data=(val_images.images[..., None], val_images.targets),
              epochs=epochs, callbacks=callbacks, verbose=verbose)
    # BackupAndRestore leaves its restored epoch on the model, and fit() would start the next
    # phase there; each phase counts its epochs from 0
    model._initial_epoch = None
    return None if checkpoint.best in (None, float("-inf")) else float(checkpoint.best)


def loss_weights(images: LoadedImages, config: TrainConfig) -> np.ndarray | None:
    """Each training image's weight in the loss, mean 1 (None: all equal). ``class_weights``:
    each class weighs the same in total. ``source_balance`` instead: within each source, its
    classes share the source's weight equally (a source keeps its size; a single-class source
    cannot be balanced and keeps its one class)."""
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


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    names = ["keras", "numpy", "pillow", "pydicom", "scikit-learn", keras.backend.backend()]
    backend_package = {"tensorflow": "tensorflow", "torch": "torch", "jax": "jax"}
    versions = {"python": platform.python_version(), "covidxray": __version__}
    for name in names:
        package = backend_package.get(name, name)
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
