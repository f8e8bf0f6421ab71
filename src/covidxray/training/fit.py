"""Train a run: choose and split the data, load it, run the two phases
(``training.phases``), finalise the run folder (``training.finalize``).

An interrupted run resumes with ``resume``: its split, its settings and every finished epoch
are kept; the result is the one an uninterrupted run would have given.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import logging
import os
import shutil
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import keras

from covidxray.errors import UserError
from covidxray.config import Preprocessing, TrainConfig
from covidxray.data.audit import exact_duplicates_across_splits
from covidxray.data.sources import select_sources
from covidxray.data.statistics import AS_THEY_ARE, RUN_PIXELS, STATISTICS_SIZE, \
    image_statistics_separability, separability_warnings
from covidxray.data.dataset import DataError, Dataset, LoadedImages, Record, discover, \
    file_hashes, load_images, with_splits
from covidxray.data.split import assign_splits, patients_across_splits, read_split_csv
from covidxray.fileutil import folder_lock
from covidxray.model.accelerator import precision_for_hardware
from covidxray.model.lungs import CARD_NAME, WEIGHTS_NAME, LungSegmenter, default_segmenter
from covidxray.model.network import build_model, stage_prefixes, unfreeze_top_stages
from covidxray.training.distribute import data_parallel, fit_to_devices
from covidxray.training.features import trunk_split
from covidxray.training.finalize import finalize_run
from covidxray.run.folder import RunFolder
from covidxray.run.metadata import RunError
from covidxray.training.phases import PHASE_NAMES, Best, Phase, best_weights_file, \
    class_count, fit_phase, full_fitting, head_fitting, top_fitting

log = logging.getLogger(__name__)


class RunExistsError(UserError, FileExistsError):
    """The output folder already holds a run; resume it or choose another folder."""


@dataclass
class Splits:
    """The data a run trains on: the data set, every record with its split, each file's
    sha256, and the loaded training and validation images; ``select``: the labelled images
    that choose the epoch and phase whose weights are kept, where they are not the validation
    split (``TrainConfig.select_on``)."""

    dataset: Dataset
    records: list[Record]
    hashes: dict[str, str]
    train: LoadedImages
    val: LoadedImages
    select: LoadedImages | None = None
    segmenter: LungSegmenter | None = None  # finds the lungs of a lung crop

    @property
    def judge(self) -> LoadedImages:
        """What the model selection scores: ``select``, else the validation split."""
        return self.select if self.select is not None else self.val


def train(config: TrainConfig, resume: bool = False, verbose: int | str = "auto",
          callbacks: tuple = ()) -> Path:
    """Train a model as ``config`` says and write ``config.out``; returns the run folder.

    With ``resume``, an interrupted run in ``config.out`` continues from its last finished epoch
    (its saved ``config.json`` is used). ``callbacks``: more Keras callbacks for every epoch
    of both phases (experiment tracking).
    """
    run = Path(config.out)
    if resume and not RunFolder(run).config_file.is_file():
        raise RunError(f"{run}: no {RunFolder(run).config_file.name} to resume from")
    run.mkdir(parents=True, exist_ok=True)
    # held before anything is looked at or written: a second job on the folder is refused
    with folder_lock(run, "covidxray train"):
        return _train(config, run, resume, verbose, callbacks)


def _train(config: TrainConfig, run: Path, resume: bool, verbose, callbacks: tuple) -> Path:
    folder = RunFolder(run)
    if resume:
        if folder.keras_file.is_file():
            raise RunExistsError(f"{run}: this run is already complete")
        config = folder.read_config()
        if folder.split_file.is_file():  # the split the interrupted run trained on
            config.split_file = str(folder.split_file)
    elif folder.config_file.exists():
        raise RunExistsError(f"{run} already holds a run: use --resume to continue it, or "
                             f"another --out")
    keras.utils.set_random_seed(config.seed)

    dataset, records, hashes = prepare_splits(config, run)
    config.save(folder.config_file)
    segmenter = lung_segmenter(config, run)
    statistics = training_image_statistics(records, config, segmenter)
    # the validation films' lungs are looked for even without a lung crop: the gate's lung
    # test is calibrated on them (finalize.fit_ood_gate)
    splits = Splits(dataset, records, hashes, _load_split(records, "train", config, segmenter),
                    _load_split(records, "val", config, segmenter or default_segmenter()),
                    selection_images(config, hashes, segmenter), segmenter)
    with precision_for_hardware(config.mixed_precision) as policy, \
            data_parallel(config.distribute, config.batch_size) as devices:
        # seeded again here: what ran before (a lung segmenter built for the first time, not
        # when cached) must not move a random backbone's initial weights
        keras.utils.set_random_seed(config.seed)
        model = build_model(config.image_size, config.backbone, config.weights, config.dropout,
                            config.augment, config.seed, config.pooled_stages,
                            class_count(config))
        best = _train_phases(model, config, splits, run, verbose, devices=devices,
                             callbacks=callbacks)
        finalize_run(model, config, splits, run, policy, selection_record(best, config, splits),
                     statistics)
    shutil.rmtree(folder.checkpoints_folder, ignore_errors=True)
    return run


def _train_phases(model: keras.Model, config: TrainConfig, splits: Splits, run: Path,
                  verbose, devices: int = 1, callbacks: tuple = ()) -> Best:
    """Phase 1 (head, frozen backbone) then phase 2 (top stages); the model ends with the
    weights of its best epoch on the selection data (``Splits.judge``), whichever phase it
    was in. A phase checkpointed as done is not run again."""
    best = Best()
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
        if devices > 1:
            fit_to_devices(fitting.batches, devices, phase.name)
        best = fit_phase(fitting, phase, classifier=model, config=config, run=run,
                         best_so_far=best, verbose=verbose, callbacks=callbacks)
    if best_weights_file(run).exists():
        with warnings.catch_warnings():  # the saved optimizer state is of no use from here on
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model.load_weights(best_weights_file(run))
    return best


def selection_record(best: Best, config: TrainConfig, splits: Splits) -> dict:
    """Which phase's weights the run kept, and on what evidence (for its metadata and log)."""
    judged = splits.judge
    on = (f"--select-on {config.select_on} ({len(judged.records)} images)"
          if splits.select is not None else
          f"the validation split ({len(judged.records)} images)")
    phases = {number: PHASE_NAMES[number] for number in sorted(best.per_phase)}
    if best.phase is None:
        evidence = "no epoch could be scored (one class only?): the last weights are kept"
    elif len(phases) == 1:
        evidence = f"only phase {best.phase} ({PHASE_NAMES[best.phase]}) was trained"
    else:
        others = [f"phase {n} ({PHASE_NAMES[n]}) reached {best.per_phase[n]:.4f}"
                  for n in phases if n != best.phase]
        evidence = (f"its best ROC-AUC on {on}, {best.score:.4f}, beat the other phase: "
                    + "; ".join(others))
    record = {"phase_kept": best.phase,
              "phase_name": PHASE_NAMES.get(best.phase, "none"),
              "epoch": None if best.epoch is None else best.epoch + 1,
              "roc_auc": best.score, "selected_on": on,
              "per_phase_roc_auc": {PHASE_NAMES[n]: v for n, v in best.per_phase.items()},
              "evidence": evidence}
    log.info("kept the weights of phase %s (%s), epoch %s: %s", record["phase_kept"],
             record["phase_name"], record["epoch"], evidence)
    return record


def _fitting(model: keras.Model, phase: Phase, config: TrainConfig, splits: Splits):
    """What ``phase`` fits: the head on cached features, the top stages on the cached frozen
    trunk (pretrained weights, some stages kept frozen), or else the whole network."""
    if phase.number == 1 and config.cached_head:
        return head_fitting(model, splits.train, splits.judge, config)
    frozen_trunk = (config.cached_trunk and config.weights.lower() != "none"
                    and config.unfreeze_stages != "all")
    if phase.number == 2 and frozen_trunk:
        split = trunk_split(model, stage_prefixes(config.backbone, config.unfreeze_stages))
        if split is not None:
            return top_fitting(split, splits.train, splits.judge, config, phase.epochs)
    return full_fitting(model, splits.train, splits.judge, config, splits.segmenter)


def prepare_splits(config: TrainConfig, run: Path) -> tuple[Dataset, list, dict[str, str]]:
    """Discover the data, give every image a split and write ``RUN/split.csv``; also returns
    every file's sha256 (read once, for the duplicate check and the data fingerprint)."""
    dataset = discover(config.data, config.positive_class, config.source_from_prefix,
                       config.strict, config.patient_aliases, config.source_aliases)
    for path, reason in dataset.skipped:
        log.warning("skipped %s: %s", path, reason)
    if config.exclude_confounded and not any(r.source for r in dataset.records):
        log.info("the data names no image's source: no source could be checked for "
                 "confounding (a source column or --source-from-prefix lets it)")
    kept, left_out = select_sources(dataset.records, config.sources, config.exclude_sources,
                                    config.exclude_confounded, by_share=not config.classes)
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
    RunFolder(run).write_split(records)
    counts = Counter((r.split, r.label) for r in records)
    log.info("split: %s", ", ".join(f"{s}/{c}={n}" for (s, c), n in sorted(counts.items())))
    return dataset, records, hashes


def _load_split(records, split: str, config: TrainConfig, segmenter=None) -> LoadedImages:
    loaded = load_images([r for r in records if r.split == split], config.preprocessing,
                         config.strict, segmenter)
    for error in loaded.failures:
        log.warning("skipped %s: %s", error.path, error.reason)
    present = set(loaded.targets.astype(int).tolist())
    if present != {0, 1}:
        raise DataError(f"the {split} split needs images of both classes; it has "
                        f"{len(loaded.records)} readable images of classes {sorted(present)}")
    return loaded


def segmenter_of(config: TrainConfig) -> LungSegmenter | None:
    """The lung segmenter ``config``'s lung crop uses (``lung_model``, else the shipped one);
    None without a lung crop."""
    return LungSegmenter.load(config.lung_model) if config.preprocessing.uses_lungs else None


def lung_segmenter(config: TrainConfig, run: Path) -> LungSegmenter | None:
    """``segmenter_of(config)``, copied into the run folder so that the run crops the same way
    whatever segmenter a later covidxray ships."""
    segmenter = segmenter_of(config)
    if segmenter is None:
        return None
    own = RunFolder(run).lungs_folder
    if not own.is_dir():
        partial = run / f".{own.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        for name in (WEIGHTS_NAME, CARD_NAME):
            shutil.copyfile(segmenter.weights_file.parent / name, partial / name)
        os.replace(partial, own)
    return LungSegmenter.load(own)


def training_image_statistics(records: list[Record], config: TrainConfig,
                              segmenter=None) -> dict:
    """How well image statistics alone separate the classes of each training source, as the
    files are and as this run prepares them (``data.statistics.image_statistics_separability``),
    logged with a warning where they give the class away; for the run's metadata and report."""
    options = {AS_THEY_ARE: Preprocessing(STATISTICS_SIZE),
               RUN_PIXELS: replace(config.preprocessing, image_size=STATISTICS_SIZE)}
    found = image_statistics_separability([r for r in records if r.split in ("train", "val")],
                                          options, segmenter, config.seed)
    for source, result in found.items():
        mine, plain = result["options"][RUN_PIXELS], result["options"][AS_THEY_ARE]
        log.info("image statistics of %s: thumbnail ROC-AUC %.2f as the files are, %.2f as "
                 "this run prepares them; histogram %.2f, %.2f; size and aspect %.2f", source,
                 plain["thumbnail"], mine["thumbnail"], plain["histogram"], mine["histogram"],
                 result["size_and_aspect"])
    for warning in separability_warnings(found):
        log.warning(warning)
    return found


def selection_images(config: TrainConfig, hashes: dict[str, str],
                     segmenter=None) -> LoadedImages | None:
    """The labelled images of ``config.select_on`` (None without it): another source than the
    training data, so that the epoch and phase kept are those that carry beyond it. A file
    also among the training data is refused."""
    if not config.select_on:
        return None
    dataset = discover(config.select_on, config.positive_class, config.source_from_prefix,
                       config.strict)
    for path, reason in dataset.skipped:
        log.warning("skipped %s: %s", path, reason)
    select_hashes, _ = file_hashes(dataset.records)
    shared = set(select_hashes.values()) & set(hashes.values())
    if shared:
        raise DataError(f"{config.select_on}: {len(shared)} of its files are also in the "
                        f"training data; selection data must be images the model does not "
                        f"train on")
    loaded = load_images(dataset.records, config.preprocessing, config.strict, segmenter)
    if set(loaded.targets.astype(int).tolist()) != {0, 1}:
        raise DataError(f"{config.select_on}: selection data need images of both classes")
    log.info("model selection on %s: %d images (%d positive), not the validation split",
             config.select_on, len(loaded.records), int(loaded.targets.sum()))
    return loaded
