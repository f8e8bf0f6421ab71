"""Finalising a run: score validation (with test-time views), freeze the threshold, the
temperature (if asked), the out-of-distribution gate and the prediction sets on it
(``training.calibrate``, the step an ensemble takes too), write the metadata, and save the
model last and atomically: a run is complete once ``model.keras`` exists."""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import dataclasses
import datetime
import logging
import math
import platform
from collections import Counter
from pathlib import Path

import keras

from covidxray.version import __version__
from covidxray.config import PREDICT, TrainConfig
from covidxray.data.dataset import fingerprint, load_images
from covidxray.fileutil import atomic_path
from covidxray.model.backbones import get_backbone
from covidxray.model.network import feature_extractor, forward, model_id, predict_scores
from covidxray.pixels.transforms import mean_over_views
from covidxray.run.folder import RunFolder
from covidxray.run.metadata import RunMetadata
from covidxray.run.ood import OODGate
from covidxray.training.calibrate import calibrate_and_gate, fit_ood_gate
from covidxray.training.phases import positive_column

log = logging.getLogger(__name__)


def finalize_run(model: keras.Model, config: TrainConfig, splits, run: Path,
                 dtype_policy: str = "float32", selection: dict | None = None,
                 image_statistics: dict | None = None) -> RunMetadata:
    """Threshold, gate, metadata and model of a trained ``model`` into ``run``; ``splits``:
    the ``training.fit.Splits`` it was trained on; ``selection``: which phase's weights were
    kept and why; ``image_statistics``: how well image statistics separate the classes of each
    training source (``training.fit.training_image_statistics``)."""
    train, val = splits.train, splits.val
    extractor = feature_extractor(model)
    positive = positive_column(config)
    # one pass over validation gives the gate its embeddings and the threshold its plain view
    val_forward = forward(model, val.images, config.batch_size, extractor, positive=positive)
    val_scores = mean_over_views(lambda x: predict_scores(model, x, config.batch_size, positive),
                                 val.images, config.test_time_views, first=val_forward.scores)
    train_forward = forward(model, train.images, config.batch_size, extractor, positive=positive)
    records, dataset = splits.records, splits.dataset
    # what the data and the config say; the threshold, temperature and validation metrics come
    # from the validation step below, whose prediction sets take the classes this one names
    described = RunMetadata(
        class_names=dataset.class_names, positive_class=dataset.positive_class,
        preprocessing=config.preprocessing, backbone=get_backbone(config.backbone).name,
        weights=config.weights, threshold=math.nan, threshold_method=config.threshold_method,
        target_sensitivity=(config.target_sensitivity
                            if config.threshold_method == "sensitivity" else None),
        test_time_views=config.test_time_views, confidence=config.confidence,
        output_classes=output_classes(config, dataset.class_names),
        model_id=model_id(model, config.backbone, config.image_size),
        split_counts={split: dict(Counter(r.label for r in records if r.split == split))
                      for split in ("train", "val", "test")},
        unreadable_training_files=len(train.failures) + len(val.failures),
        data_fingerprint=fingerprint([r for r in records if r.split in ("train", "val")],
                                     splits.hashes),
        data_root=str(Path(dataset.root).resolve()), sources_left_out=dataset.sources_left_out,
        synthetic_data=dataset.synthetic, dtype_policy=dtype_policy,
        selection=selection or {}, image_statistics=image_statistics or {},
        no_lungs_in_training=(len(train.no_lungs) + len(val.no_lungs)
                              if config.preprocessing.uses_lungs else 0),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        covidxray_version=__version__, backend=keras.backend.backend(),
        versions=library_versions())
    fitted = calibrate_and_gate(
        val_scores, train_forward, train, val_forward, val,
        [described.negative_label, described.positive_class],
        threshold_method=config.threshold_method, target_sensitivity=config.target_sensitivity,
        calibrate=config.calibrate, confidence=config.confidence)
    metadata = dataclasses.replace(described, threshold=fitted.threshold,
                                   temperature=fitted.temperature,
                                   validation_metrics=fitted.validation_metrics)
    log.info("validation ROC-AUC %.3f; threshold %.4f (%s)",
             fitted.validation_metrics["roc_auc"], fitted.threshold, config.threshold_method)
    folder = RunFolder(run)
    fitted.gate.save(folder.gate_file)
    fitted.sets.save(folder.sets_file)
    metadata.save(folder.metadata_file)
    save_model_atomic(model, folder.keras_file)  # last: the run is complete once it exists
    return metadata


def output_classes(config: TrainConfig, class_names: list[str]) -> list[str]:
    """A softmax head's classes as the data spell them (empty for one sigmoid unit)."""
    if not config.classes:
        return []
    spelling = {name.lower(): name for name in class_names}
    return [spelling.get(c.lower(), c) for c in config.classes]


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


def refit_ood_gate(run_dir: str | Path, batch_size: int = PREDICT.batch_size) -> OODGate:
    """Fit a run's gate again from its own ``split.csv`` (a run from an older version)."""
    from covidxray.run.predictor import Predictor
    run_dir = Path(run_dir)
    predictor = Predictor.load(run_dir)
    records = RunFolder(run_dir).read_split(predictor.positive_class)
    split = {name: load_images([r for r in records if r.split == name], predictor.preprocessing,
                               segmenter=predictor.segmenter)
             for name in ("train", "val")}
    passes = {name: predictor.engine.forward(images.images, batch_size)
              for name, images in split.items()}
    gate = fit_ood_gate(passes["train"], split["train"], passes["val"], split["val"])
    gate.save(RunFolder(run_dir).gate_file)
    return gate


def save_model_atomic(model: keras.Model, path: Path) -> None:
    """Save weights and architecture without the optimizer state (a third of the size).

    A new, uncompiled functional model over the same layers carries no optimizer (a clone
    would be compiled again, and its optimizer variables saved).
    """
    from covidxray.training.phases import weights_bytes
    inference_model = keras.Model(model.inputs, model.outputs, name=model.name)
    with atomic_path(path, suffix=".keras",
                     expected_bytes=weights_bytes(inference_model.weights)) as tmp:
        inference_model.save(tmp)
