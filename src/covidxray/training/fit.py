"""Train a run: choose and split the data, load it, run the two phases
(``training.phases``), finalise the run folder (``training.finalize``).

An interrupted run resumes with ``resume``: its split, its settings and every finished epoch
are kept; the result is the one an uninterrupted run would have given.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import keras

from covidxray.config import TrainConfig
from covidxray.data.audit import exact_duplicates_across_splits, select_sources
from covidxray.data.dataset import DataError, Dataset, LoadedImages, Record, discover, \
    file_hashes, load_images, with_splits
from covidxray.data.split import assign_splits, patients_across_splits, read_split_csv, \
    write_split_csv
from covidxray.model.accelerator import precision_for_hardware
from covidxray.model.network import build_model, stage_prefixes, unfreeze_top_stages
from covidxray.training.distribute import data_parallel
from covidxray.training.features import trunk_split
from covidxray.training.finalize import finalize_run
from covidxray.training.phases import Phase, best_weights_file, checkpoint_folder, fit_phase, \
    full_fitting, head_fitting, top_fitting

log = logging.getLogger(__name__)


class RunExistsError(FileExistsError):
    """The output folder already holds a run; resume it or choose another folder."""


@dataclass
class Splits:
    """The data a run trains on: the data set, every record with its split, each file's
    sha256, and the loaded training and validation images."""

    dataset: Dataset
    records: list[Record]
    hashes: dict[str, str]
    train: LoadedImages
    val: LoadedImages


def train(config: TrainConfig, resume: bool = False, verbose: int | str = "auto",
          callbacks: tuple = ()) -> Path:
    """Train a model as ``config`` says and write ``config.out``; returns the run folder.

    With ``resume``, an interrupted run in ``config.out`` continues from its last finished epoch
    (its saved ``config.json`` is used). ``callbacks``: more Keras callbacks for every epoch
    of both phases (experiment tracking).
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
    splits = Splits(dataset, records, hashes, _load_split(records, "train", config),
                    _load_split(records, "val", config))
    with precision_for_hardware(config.mixed_precision) as policy, \
            data_parallel(config.distribute, config.batch_size) as devices:
        model = build_model(config.image_size, config.backbone, config.weights, config.dropout,
                            config.augment, config.seed)
        _train_phases(model, config, splits, run, verbose, whole_batches=devices > 1,
                      callbacks=callbacks)
        finalize_run(model, config, splits, run, policy)
    shutil.rmtree(checkpoint_folder(run), ignore_errors=True)
    return run


def _train_phases(model: keras.Model, config: TrainConfig, splits: Splits, run: Path,
                  verbose, whole_batches: bool = False, callbacks: tuple = ()) -> None:
    """Phase 1 (head, frozen backbone) then phase 2 (top stages); the model ends with the
    weights of its best validation epoch. A phase checkpointed as done is not run again."""
    best = None
    for phase in (Phase(1, config.head_epochs, config.head_learning_rate),
                  Phase(2, config.finetune_epochs, config.finetune_learning_rate)):
        if phase.epochs == 0:
            continue
        if phase.number == 2:
            if best_weights_file(run).exists():
                model.load_weights(best_weights_file(run))
            unfreeze_top_stages(model, config.backbone, config.unfreeze_stages,
                                freeze_batchnorm=config.weights.lower() != "none")
        log.info("phase %d (%s): %d epochs at learning rate %g", phase.number, phase.name,
                 phase.epochs, phase.learning_rate)
        fitting = _fitting(model, phase, config, splits)
        # split over devices, every batch must be whole: the rest of an epoch waits its turn
        fitting.batches.drop_remainder = whole_batches
        best = fit_phase(fitting, phase, classifier=model, config=config, run=run,
                         best_so_far=best, verbose=verbose, callbacks=callbacks)
    if best_weights_file(run).exists():
        with warnings.catch_warnings():  # the saved optimizer state is of no use from here on
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(best_weights_file(run))


def _fitting(model: keras.Model, phase: Phase, config: TrainConfig, splits: Splits):
    """What ``phase`` fits: the head on cached features, the top stages on the cached frozen
    trunk (pretrained weights, some stages kept frozen), or else the whole network."""
    if phase.number == 1 and config.cached_head:
        return head_fitting(model, splits.train, splits.val, config)
    frozen_trunk = (config.cached_trunk and config.weights.lower() != "none"
                    and config.unfreeze_stages != "all")
    if phase.number == 2 and frozen_trunk:
        split = trunk_split(model, stage_prefixes(config.backbone, config.unfreeze_stages))
        if split is not None:
            return top_fitting(split, splits.train, splits.val, config, phase.epochs)
    return full_fitting(model, splits.train, splits.val, config)


def prepare_splits(config: TrainConfig, run: Path) -> tuple[Dataset, list, dict[str, str]]:
    """Discover the data, give every image a split and write ``RUN/split.csv``; also returns
    every file's sha256 (read once, for the duplicate check and the data fingerprint)."""
    dataset = discover(config.data, config.positive_class, config.source_from_prefix)
    for path, reason in dataset.skipped:
        log.warning("skipped %s: %s", path, reason)
    if config.exclude_confounded and not any(r.source for r in dataset.records):
        log.info("the data names no image's source: no source could be checked for "
                 "confounding (a source column or --source-from-prefix lets it)")
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
    hashes, unreadable = file_hashes(records)
    for path, reason in unreadable:
        log.warning("skipped %s: %s", path, reason)
    records = [r for r in records if r.path in hashes]
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
