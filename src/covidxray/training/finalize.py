"""Finalising a run: freeze the threshold on validation (after test-time views and, if asked,
temperature scaling), fit the out-of-distribution gate, write the metadata, and save the model
last and atomically: a run is complete once ``model.keras`` exists."""

from __future__ import annotations

import datetime
import logging
import platform
from collections import Counter
from pathlib import Path

import keras

from covidxray.version import __version__
from covidxray.config import TrainConfig
from covidxray.data.dataset import LoadedImages, fingerprint, load_images
from covidxray.evaluation.metrics import binary_metrics, choose_threshold
from covidxray.fileutil import atomic_path
from covidxray.model.backbones import get_backbone
from covidxray.model.network import feature_extractor, forward, model_id, predict_scores
from covidxray.model.outputs import Forward
from covidxray.pixels.transforms import mean_over_views
from covidxray.run.calibration import apply_temperature, fit_temperature
from covidxray.run.conformal import CONFORMAL_FILE, ConformalSets
from covidxray.run.metadata import METADATA_FILE, RunMetadata
from covidxray.run.ood import LUNG_TEST_MIN_SHARE, OOD_FILE, OODGate
from covidxray.training.phases import positive_column

log = logging.getLogger(__name__)
FEW_CALIBRATION_IMAGES = 20  # per class: fewer, and the prediction sets are coarse


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
        confidence=config.confidence,
        output_classes=output_classes(config, dataset.class_names),
        model_id=model_id(model, config.backbone, config.image_size), validation_metrics=val_metrics,
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
    train_forward = forward(model, train.images, config.batch_size, extractor, positive=positive)
    fit_ood_gate(train_forward, train, val_forward, val).save(run / OOD_FILE)
    # prediction sets calibrated on the scores the threshold was chosen on
    sets = ConformalSets.fit(val_scores, val.targets, [metadata.negative_label,
                                                        metadata.positive_class],
                             config.confidence)
    if min(sets.sizes) < FEW_CALIBRATION_IMAGES:
        log.warning("the prediction sets are calibrated on %d and %d validation films: at "
                    "%.0f%% confidence a set can only leave a class out when (almost) no film "
                    "of it scored beyond this one, so many films will be 'uncertain: refer'",
                    *sets.sizes, 100 * config.confidence)
    sets.save(run / CONFORMAL_FILE)
    metadata.save(run / METADATA_FILE)
    save_model_atomic(model, run / "model.keras")  # last: the run is complete once it exists
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


def fit_ood_gate(train: Forward, train_images: LoadedImages, val: Forward,
                 val_images: LoadedImages) -> OODGate:
    """The out-of-distribution gate of a model, fitted on its passes over its own training
    and validation images."""
    if len(val_images.records) < 50:
        log.warning("the out-of-distribution gate's thresholds come from %d validation images: "
                    "with so few they are rough, and some X-rays like the training ones will "
                    "be flagged", len(val_images.records))
    lung_test = True
    if val_images.lungs_checked and val_images.records:
        share = 1 - len(val_images.no_lungs) / len(val_images.records)
        lung_test = share >= LUNG_TEST_MIN_SHARE
        if not lung_test:
            log.warning("the lung segmenter finds plausible lungs on only %.0f%% of the "
                        "validation films: the gate's lung test is off for this run (it would "
                        "flag films like the ones it trained on)", 100 * share)
    return OODGate.fit(train.embeddings, train_images.images, val.embeddings, val_images.images,
                       lung_test=lung_test)


def refit_ood_gate(run_dir: str | Path, batch_size: int = 32) -> OODGate:
    """Fit a run's gate again from its own ``split.csv`` (a run from an older version)."""
    from covidxray.data.split import read_split_records
    from covidxray.run.predictor import Predictor
    run_dir = Path(run_dir)
    predictor = Predictor.load(run_dir)
    records = read_split_records(run_dir / "split.csv", predictor.positive_class)
    split = {name: load_images([r for r in records if r.split == name], predictor.preprocessing,
                               segmenter=predictor.segmenter)
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
    from covidxray.training.phases import weights_bytes
    inference_model = keras.Model(model.inputs, model.outputs, name=model.name)
    with atomic_path(path, suffix=".keras",
                     expected_bytes=weights_bytes(inference_model.weights)) as tmp:
        inference_model.save(tmp)
