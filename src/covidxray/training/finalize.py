"""Finalising a run: freeze the threshold on validation (after test-time views and, if asked,
temperature scaling), fit the out-of-distribution gate, write the metadata, and save the model
last and atomically: a run is complete once ``model.keras`` exists."""

from __future__ import annotations

import datetime
import hashlib
import logging
import platform
from collections import Counter
from pathlib import Path

import keras
import numpy as np

from covidxray import __version__
from covidxray.config import TrainConfig
from covidxray.data.dataset import LoadedImages, fingerprint, load_images
from covidxray.evaluation.metrics import apply_temperature, binary_metrics, choose_threshold, \
    fit_temperature
from covidxray.fileutil import atomic_path
from covidxray.model.backbones import get_backbone
from covidxray.model.network import feature_extractor, forward, predict_scores
from covidxray.model.outputs import Forward
from covidxray.pixels.transforms import mean_over_views
from covidxray.run.metadata import METADATA_FILE, RunMetadata
from covidxray.run.ood import OOD_FILE, OODGate

log = logging.getLogger(__name__)


def finalize_run(model: keras.Model, config: TrainConfig, splits, run: Path,
                 dtype_policy: str = "float32") -> RunMetadata:
    """Threshold, gate, metadata and model of a trained ``model`` into ``run``; ``splits``:
    the ``training.fit.Splits`` it was trained on."""
    train, val = splits.train, splits.val
    extractor = feature_extractor(model)
    # one pass over validation gives the gate its embeddings and the threshold its plain view
    val_forward = forward(model, val.images, config.batch_size, extractor)
    val_scores = mean_over_views(lambda x: predict_scores(model, x, config.batch_size),
                                 val.images, config.test_time_views, first=val_forward.scores)
    temperature = None
    if config.calibrate:
        temperature = fit_temperature(val.targets, val_scores)
        val_scores = apply_temperature(val_scores, temperature)
        log.info("temperature scaling: T = %.3f (fitted on validation)", temperature)
    threshold = choose_threshold(val.targets, val_scores, config.threshold_method,
                                 config.target_sensitivity)
    val_metrics = binary_metrics(val.targets, val_scores, threshold)
    log.info("validation ROC-AUC %.3f; threshold %.4f (%s)", val_metrics["roc_auc"], threshold,
             config.threshold_method)
    records, dataset = splits.records, splits.dataset
    metadata = RunMetadata(
        class_names=dataset.class_names, positive_class=dataset.positive_class,
        preprocessing=config.preprocessing, backbone=get_backbone(config.backbone).name,
        weights=config.weights, threshold=threshold, threshold_method=config.threshold_method,
        target_sensitivity=(config.target_sensitivity
                            if config.threshold_method == "sensitivity" else None),
        temperature=temperature, test_time_views=config.test_time_views,
        model_id=model_id(model, config), validation_metrics=val_metrics,
        split_counts={split: dict(Counter(r.label for r in records if r.split == split))
                      for split in ("train", "val", "test")},
        unreadable_training_files=len(train.failures) + len(val.failures),
        data_fingerprint=fingerprint([r for r in records if r.split in ("train", "val")],
                                     splits.hashes),
        data_root=str(Path(dataset.root).resolve()), sources_left_out=dataset.sources_left_out,
        synthetic_data=dataset.synthetic, dtype_policy=dtype_policy,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        covidxray_version=__version__, backend=keras.backend.backend(),
        versions=library_versions())
    train_forward = forward(model, train.images, config.batch_size, extractor)
    fit_ood_gate(train_forward, train, val_forward, val).save(run / OOD_FILE)
    metadata.save(run / METADATA_FILE)
    save_model_atomic(model, run / "model.keras")  # last: the run is complete once it exists
    return metadata


def model_id(model: keras.Model, config: TrainConfig) -> str:
    """Backbone, image size and the first 12 hex digits of the sha256 of the weights: two runs
    share an id only if they share every weight."""
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return f"{get_backbone(config.backbone).name}-{config.image_size}px-{digest.hexdigest()[:12]}"


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    names = ["keras", "numpy", "pillow", "pydicom", "scikit-learn", keras.backend.backend()]
    versions = {"python": platform.python_version(), "covidxray": __version__}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


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
    passes = {name: predictor.engine.forward(images.images, batch_size)
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
