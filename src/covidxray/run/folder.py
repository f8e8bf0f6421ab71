"""The run folder: the contract between training and everything downstream.

``RunFolder`` names every file a run holds (and an exported model, and an ensemble), and reads
and checks the ones a prediction depends on, once, at load: a damaged, tampered or out-of-range
file fails there, naming the file and what is wrong with it, never later and never as a
traceback. Nothing else spells a run file's name.

A run trained by covidxray::

    RUN/metadata.json     RunMetadata: what the run is (written last but one)
    RUN/model.keras       the classifier (written last: a run is complete once it exists)
    RUN/ood.npz           the out-of-distribution gate
    RUN/conformal.npz     the prediction sets
    RUN/config.json       the TrainConfig it was trained with
    RUN/split.csv         every film with its split (read by covidxray.data.split)
    RUN/history.csv       every epoch's metrics
    RUN/metrics.json      evaluate's result on its test split; other data: RUN/evaluations/
    RUN/lungs/            the lung segmenter its preprocessing used, where it needs one
    RUN/serve/            the server's and the DICOM node's own files (the prediction
                          record; outbox/, results waiting for the PACS)

An exported model holds ``model.onnx`` and ``export.json`` (with model.onnx's sha256) instead
of model.keras; an ensemble holds its members under ``members/`` and no model of its own.
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

from covidxray.fileutil import file_sha256
from covidxray.run.metadata import RunError, RunMetadata

METADATA = "metadata.json"
KERAS_MODEL = "model.keras"
ONNX_MODEL = "model.onnx"
GATE = "ood.npz"
SETS = "conformal.npz"
CONFIG = "config.json"
SPLIT = "split.csv"
HISTORY = "history.csv"
METRICS = "metrics.json"
EVALUATIONS = "evaluations"
MEMBERS = "members"
LUNGS = "lungs"
LUNGS_ONNX = "lungs.onnx"  # in an exported folder's lungs/
EXPORT_RECORD = "export.json"
SERVE = "serve"
OUTBOX = "outbox"  # in serve/: the DICOM node's results waiting for the PACS
ENSEMBLE_PLAN = "ensemble.json"  # an ensemble being trained: how many members
CHECKPOINTS = ".checkpoints"  # an interrupted training's epochs
REPORT = "report.html"
AUDIT = "audit.json"

# what a file that cannot be read raises, whatever the reader: a damaged file
_DAMAGE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, TypeError)


class RunFolder:
    """The files of one run folder (a trained run, an exported model or an ensemble)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- names ----------------------------------------------------------------------------

    @property
    def metadata_file(self) -> Path:
        return self.path / METADATA

    @property
    def keras_file(self) -> Path:
        return self.path / KERAS_MODEL

    @property
    def onnx_file(self) -> Path:
        return self.path / ONNX_MODEL

    @property
    def gate_file(self) -> Path:
        return self.path / GATE

    @property
    def sets_file(self) -> Path:
        return self.path / SETS

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def evaluations_folder(self) -> Path:
        return self.path / EVALUATIONS

    @property
    def members_folder(self) -> Path:
        return self.path / MEMBERS

    @property
    def lungs_folder(self) -> Path:
        return self.path / LUNGS

    @property
    def lungs_onnx_file(self) -> Path:
        return self.path / LUNGS / LUNGS_ONNX

    @property
    def export_file(self) -> Path:
        return self.path / EXPORT_RECORD

    @property
    def serve_folder(self) -> Path:
        return self.path / SERVE

    @property
    def outbox_folder(self) -> Path:
        return self.path / SERVE / OUTBOX

    @property
    def ensemble_plan_file(self) -> Path:
        return self.path / ENSEMBLE_PLAN

    @property
    def checkpoints_folder(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def report_file(self) -> Path:
        return self.path / REPORT

    @property
    def audit_file(self) -> Path:
        return self.path / AUDIT

    # --- what kind of folder -------------------------------------------------------------

    @property
    def is_exported(self) -> bool:
        return self.onnx_file.is_file() and not self.keras_file.is_file()

    @property
    def is_ensemble(self) -> bool:
        return self.members_folder.is_dir() and not (self.keras_file.is_file()
                                                     or self.onnx_file.is_file())

    @property
    def has_model(self) -> bool:
        return self.keras_file.is_file() or self.onnx_file.is_file() or \
            self.members_folder.is_dir()

    def require_complete(self) -> None:
        """A folder a prediction can be made from: a model and its metadata."""
        missing = [name for name, present in (
            (f"{KERAS_MODEL} or {ONNX_MODEL}", self.has_model),
            (METADATA, self.metadata_file.is_file())) if not present]
        if missing:
            raise RunError(f"{self.path}: not a complete run (missing {', '.join(missing)}); "
                           f"train one with 'covidxray train DATA --out {self.path}'")

    # --- readers, checked ----------------------------------------------------------------

    def metadata(self) -> RunMetadata:
        """``RunMetadata``, validated (types, ranges, versions)."""
        return RunMetadata.load(self.metadata_file)

    def gate(self, required: bool = True):
        """The out-of-distribution gate (None where the run has none). A gate file that
        cannot be read fails closed: an error naming it, unless ``required`` is False (then
        a warning, and no gate)."""
        from covidxray.run.ood import OODGate
        if not self.gate_file.is_file():
            return None
        try:
            return OODGate.load(self.gate_file)
        except _DAMAGE as error:
            raise RunError(f"{self.gate_file} is damaged ({_why(error)}): every verdict "
                           f"rests on it, so nothing is predicted without it; restore the "
                           f"run's file, or pass --no-gate to predict with no gate "
                           f"(no film is then flagged as unlike a chest X-ray)") from error

    def sets(self, metadata: RunMetadata):
        """The prediction sets (None where the run has none), checked against the run: the
        same classes, in the run's order, and a confidence in (0, 1)."""
        from covidxray.run.conformal import ConformalSets
        if not self.sets_file.is_file():
            return None
        try:
            sets = ConformalSets.load(self.sets_file)
        except _DAMAGE as error:
            raise RunError(f"{self.sets_file} is damaged ({_why(error)}); restore the run's "
                           f"file") from error
        expected = [metadata.negative_label, metadata.positive_class]
        if sets.classes != expected:
            raise RunError(f"{self.sets_file}: its classes {{{', '.join(sets.classes)}}} are "
                           f"not this run's {{{', '.join(expected)}}} (a file of another "
                           f"run?); restore the run's file")
        if not 0 < sets.confidence < 1 or not all(len(c) for c in sets.calibration):
            raise RunError(f"{self.sets_file}: confidence {sets.confidence} or an empty "
                           f"calibration class: not a set this run could have made")
        return sets

    def export_record(self) -> dict:
        """``export.json`` of an exported model."""
        try:
            return json.loads(self.export_file.read_text())
        except (OSError, ValueError) as error:
            raise RunError(f"{self.export_file}: cannot be read ({_why(error)})") from error

    def check_export(self) -> None:
        """An exported model's ``model.onnx`` is the one its ``export.json`` recorded."""
        recorded = self.export_record().get("onnx_sha256") if self.export_file.is_file() \
            else None
        if recorded is None:
            return  # an export made before the hash was recorded
        if file_sha256(self.onnx_file) != recorded:
            raise RunError(f"{self.onnx_file} does not match this export (its sha256 is not the "
                           f"{recorded[:12]}... {EXPORT_RECORD} recorded: truncated, damaged "
                           f"or swapped); export the run again")

    def member_folders(self, metadata: RunMetadata) -> list["RunFolder"]:
        """An ensemble's members, resolved against its folder: each inside it (unless the
        metadata says its members live elsewhere, ``external_members``), none the ensemble
        itself or a folder that holds it."""
        own = self.path.resolve()
        members = []
        for name in metadata.members:
            path = Path(name) if Path(name).is_absolute() else self.path / name
            resolved = path.resolve()
            if resolved == own or resolved in own.parents:
                raise RunError(f"ensemble {self.path}: member {name!r} is the ensemble itself "
                               f"(or a folder that holds it)")
            if own not in resolved.parents and not metadata.external_members:
                raise RunError(f"ensemble {self.path}: member {name!r} lies outside the "
                               f"ensemble's folder; members live under {MEMBERS}/ (an ensemble "
                               f"whose metadata says external_members may point elsewhere)")
            members.append(RunFolder(path))
        return members

    # --- what training writes ------------------------------------------------------------

    def read_split(self, positive_class: str) -> list:
        """Every film the run knows with its split (``data.split`` reads the format)."""
        from covidxray.data.split import read_split_records
        if not self.split_file.is_file():
            raise RunError(f"{self.path}: no {SPLIT}, so the films it trained on are unknown")
        return read_split_records(self.split_file, positive_class)

    def split_paths(self, split: str) -> list[str]:
        """The files of one split (``train``, ``val``, ``test``; none where the run has no
        split file)."""
        if not self.split_file.is_file():
            return []
        from covidxray.data.split import read_split_csv
        return [path for path, name in read_split_csv(self.split_file).items() if name == split]

    def write_split(self, records) -> None:
        from covidxray.data.split import write_split_csv
        write_split_csv(self.split_file, records)


    def read_config(self):
        """The ``TrainConfig`` the run was trained with."""
        from covidxray.config import TrainConfig
        try:
            return TrainConfig.load(self.config_file)
        except (OSError, ValueError, TypeError) as error:
            raise RunError(f"{self.config_file}: cannot be read ({_why(error)})") from error

    def read_metrics(self) -> dict | None:
        """``metrics.json`` as JSON (None where the run has not been evaluated; the evaluation
        package types it: ``evaluation.result.EvaluationResult``)."""
        if not self.metrics_file.is_file():
            return None
        try:
            return json.loads(self.metrics_file.read_text())
        except (OSError, ValueError) as error:
            raise RunError(f"{self.metrics_file}: cannot be read ({_why(error)})") from error


def _why(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)
