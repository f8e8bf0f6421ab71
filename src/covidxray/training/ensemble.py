"""Building an ensemble run from trained runs (``covidxray ensemble RUN RUN ... --out ENS``)
or training one (``covidxray train --ensemble K``: K seeds on one split).

The members are copied into ``ENS/members/`` (or trained there). What a single run chooses on
its validation split, the ensemble chooses again on the validation films all its members share
and none trained on: the threshold, the temperature (if asked), the out-of-distribution gate
(on the members' embeddings side by side, fitted on the training films they share) and the
prediction sets. The ensemble is complete once its ``metadata.json`` exists: it is written last.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidxray.errors import ConfigError, UserError
from covidxray.config import PREDICT, TrainConfig
from covidxray.data.dataset import LoadedImages
from covidxray.fileutil import folder_lock
from covidxray.run.ensemble import EnsembleEngine, EnsembleError
from covidxray.run.folder import SERVE, RunFolder
from covidxray.run.inputs import Prepared
from covidxray.run.predictor import Predictor
from covidxray.training.calibrate import calibrate_and_gate
from covidxray.version import __version__

log = logging.getLogger(__name__)
MIN_SHARED_PER_CLASS = 2  # validation films of each class the members must share, at least
FEW_SHARED_PER_CLASS = 20  # fewer: the threshold and the sets rest on little; a warning


def train_ensemble(config: TrainConfig, members: int, resume: bool = False,
                   verbose: int | str = "auto", callbacks: tuple = ()) -> Path:
    """``members`` runs of ``config``, seeds ``config.seed`` and on, all on the first one's
    split, in ``config.out/members/``; then the ensemble of them in ``config.out``. An
    interrupted one continues with ``resume`` (finished members are kept)."""
    from covidxray.training.fit import train
    if members < 2:
        raise ConfigError(f"an ensemble needs at least 2 members, got {members}")
    out = Path(config.out)
    if RunFolder(out).metadata_file.exists():
        raise UserError(f"{out} already holds a complete ensemble")
    folders = []
    for index in range(members):
        folder = RunFolder(out).members_folder / str(index)
        if not RunFolder(folder).keras_file.is_file():
            member = replace(config, out=str(folder), seed=config.seed + index,
                             split_file=str(RunFolder(folders[0]).split_file) if folders
                             else config.split_file)
            log.info("ensemble member %d of %d (seed %d)", index + 1, members, member.seed)
            train(member, resume=resume and RunFolder(folder).config_file.is_file(),
                  verbose=verbose, callbacks=callbacks)
        folders.append(folder)
    return build_ensemble(folders, out, confidence=config.confidence,
                          calibrate=config.calibrate, copy=False)


def build_ensemble(runs, out: str | Path, confidence: float | None = None,
                   calibrate: bool = TrainConfig.calibrate, copy: bool = True,
                   batch_size: int = PREDICT.batch_size) -> Path:
    """The ensemble of ``runs`` (run folders) in ``out``; ``confidence`` None: the first
    run's, else ``TrainConfig.confidence``; ``copy``: copy them into ``out/members/`` first
    (False: they are there already)."""
    out = Path(out)
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise EnsembleError("an ensemble needs at least 2 runs")
    if RunFolder(out).metadata_file.exists():
        raise UserError(f"{out} already holds a run or an ensemble; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "covidxray ensemble"):
        members = [Predictor.load(r) for r in runs]
        _check_compatible(runs, members)
        if copy:
            runs = _copied(runs, out)
            members = [Predictor.load(r) for r in runs]
        return _finish(members, runs, out, confidence, calibrate, batch_size)


def _check_compatible(runs: list[Path], members: list[Predictor]) -> None:
    first = members[0].metadata
    for run, member in zip(runs, members):
        meta = member.metadata
        if meta.members:
            raise EnsembleError(f"{run} is an ensemble itself: give its members instead")
        if (meta.positive_class, sorted(meta.class_names)) != (first.positive_class,
                                                                sorted(first.class_names)):
            raise EnsembleError(f"{run} tells {meta.positive_class} from "
                                f"{meta.negative_classes}, {runs[0]} {first.positive_class} "
                                f"from {first.negative_classes}: not one question")
        if (meta.image_size, meta.preprocessing.crop) != (first.image_size,
                                                          first.preprocessing.crop):
            raise EnsembleError(
                f"{run} reads {meta.image_size} px with crop {meta.preprocessing.crop!r}, "
                f"{runs[0]} {first.image_size} px with crop {first.preprocessing.crop!r}: the "
                f"members of an ensemble share the image size and the crop (so that their "
                f"heat maps lie on the same pixels); their intensity, backbone and seed may "
                f"differ")
        if not RunFolder(run).split_file.is_file():
            raise EnsembleError(f"{run}: no {RunFolder(run).split_file.name}, so the films it "
                                f"trained on are unknown")
    if first.preprocessing.uses_lungs:
        cards = {m.segmenter.card.sha256 for m in members}
        if len(cards) > 1:
            raise EnsembleError("the members crop to the lungs with different segmenters")


def _copied(runs: list[Path], out: Path) -> list[Path]:
    """The runs copied into ``out/members/<i>`` (each copied whole, then renamed)."""
    folders = []
    for index, run in enumerate(runs):
        target = RunFolder(out).members_folder / str(index)
        if not target.is_dir():
            partial = target.with_name(f".{index}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(run, partial, ignore=shutil.ignore_patterns(SERVE, ".lock"))
            partial.rename(target)
        folders.append(target)
    return folders


def shared_splits(runs: list[Path], positive_class: str) -> dict[str, list]:
    """The records each split holds for every member: a film is in the ensemble's validation
    (test) split only where it is validation (test) for all of them, so that no member
    trained on it."""
    per_run = [{r.path: r for r in RunFolder(run).read_split(positive_class)}
               for run in runs]
    out = {}
    for split in ("train", "val", "test"):
        paths = set.intersection(*({p for p, r in records.items() if r.split == split}
                                   for records in per_run))
        out[split] = sorted((per_run[0][p] for p in paths), key=lambda r: r.path)
    return out


def _prepared(predictor: Predictor, records) -> LoadedImages:
    """The members' inputs (n, K, size, size) of the readable ``records``."""
    items = [x for batch in predictor.prepare_many([r.path for r in records]) for x in batch]
    for item in items:
        if not isinstance(item, Prepared):
            log.warning("skipped %s: %s", item.path, item.error)
    kept = [(r, x) for r, x in zip(records, items) if isinstance(x, Prepared)]
    return LoadedImages(np.stack([x.image for _, x in kept]), [r for r, _ in kept], [],
                        [r.path for r, x in kept if x.lungs is not None and not x.lungs.plausible],
                        predictor.segmenter is not None)


def _finish(members: list[Predictor], runs: list[Path], out: Path,
            confidence: float | None, calibrate: bool, batch_size: int) -> Path:
    first = members[0].metadata
    relative = [str(r.relative_to(out)) for r in runs]
    splits = shared_splits(runs, first.positive_class)
    val_counts = Counter(r.target for r in splits["val"])
    if min(val_counts[0], val_counts[1]) < MIN_SHARED_PER_CLASS:
        raise EnsembleError(
            f"the members share {val_counts[1]} positive and {val_counts[0]} negative "
            f"validation films that none of them trained on; at least "
            f"{MIN_SHARED_PER_CLASS} of each are needed to choose the ensemble's threshold. "
            f"Train the members on one split ('covidxray train --ensemble K', or --split "
            f"RUN/split.csv)")
    if min(val_counts[0], val_counts[1]) < FEW_SHARED_PER_CLASS:
        log.warning("the ensemble's threshold and prediction sets rest on %d positive and %d "
                    "negative shared validation films: rough", val_counts[1], val_counts[0])
    ensemble = Predictor(EnsembleEngine(members), first, out, None, members[0].segmenter)
    val, train = _prepared(ensemble, splits["val"]), _prepared(ensemble, splits["train"])
    val_pass = ensemble.engine.forward(val.images, batch_size)
    # the members' mean has no test-time views of its own: its validation scores are the pass's
    fitted = calibrate_and_gate(
        val_pass.scores, ensemble.engine.forward(train.images, batch_size),
        _first_inputs(train), val_pass, _first_inputs(val),
        [first.negative_label, first.positive_class], threshold_method=first.threshold_method,
        target_sensitivity=first.target_sensitivity, calibrate=calibrate,
        confidence=confidence or first.confidence)
    threshold, val_metrics = fitted.threshold, fitted.validation_metrics
    ids = [m.metadata.model_id for m in members]
    metadata = dataclasses.replace(
        first, backbone=f"ensemble of {len(members)}: " + ", ".join(
            m.metadata.backbone for m in members), weights="members", threshold=threshold,
        temperature=fitted.temperature, test_time_views=0, confidence=fitted.sets.confidence,
        model_id=f"ensemble{len(members)}-{first.image_size}px-"
                 + hashlib.sha256("|".join(ids).encode()).hexdigest()[:12],
        validation_metrics=val_metrics, members=relative,
        split_counts={s: dict(Counter(r.label for r in records))
                      for s, records in splits.items()},
        data_fingerprint=hashlib.sha256("|".join(m.metadata.data_fingerprint
                                                 for m in members).encode()).hexdigest(),
        selection={"members": {name: m.metadata.selection for name, m in
                               zip(relative, members)},
                   "evidence": f"each member kept its own weights; the ensemble's threshold, "
                               f"gate and sets come from the {len(val.records)} validation "
                               f"films its members share"},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        covidxray_version=__version__)
    log.info("ensemble of %d: validation ROC-AUC %.3f on %d shared films (members %s); "
             "threshold %.4f", len(members), val_metrics["roc_auc"], len(val.records),
             ", ".join(f"{m.metadata.validation_metrics.get('roc_auc', float('nan')):.3f}"
                       for m in members), threshold)
    folder, first_run = RunFolder(out), RunFolder(runs[0])
    fitted.gate.save(folder.gate_file)
    fitted.sets.save(folder.sets_file)
    folder.write_split([r for records in splits.values() for r in records])
    if first.preprocessing.uses_lungs and first_run.lungs_folder.is_dir() and \
            not folder.lungs_folder.is_dir():
        shutil.copytree(first_run.lungs_folder, folder.lungs_folder)
    metadata.save(folder.metadata_file)  # last: the ensemble is complete once it exists
    return out


def _first_inputs(images: LoadedImages) -> LoadedImages:
    """The first member's inputs (what the gate's layout test looks at)."""
    return LoadedImages(images.images[:, 0], images.records, images.failures, images.no_lungs,
                        images.lungs_checked)
