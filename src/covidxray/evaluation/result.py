"""What ``evaluate`` finds, typed and versioned: ``EvaluationResult``, written as
``RUN/metrics.json`` (the run's own test split) or ``RUN/evaluations/*.json`` (other data).

The file carries ``schema_version``. Version 1 (before the typed result: no version field) is
read as it is, every part it lacks left empty; a version newer than this code knows is refused
with a clear error. The parts below the top level (metrics with their intervals, per source,
per class, curves, the tests of where the model looks) stay plain JSON-able mappings, each
described on its field.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from covidxray.errors import UserError
from covidxray.fileutil import schema_version, write_json_atomic

SCHEMA_VERSION = 2


class EvaluationFileError(UserError, ValueError):
    """A file that is not an evaluation this version can read."""


@dataclass
class EvaluationResult:
    """A run scored on labelled films at its frozen threshold."""

    notice: str
    synthetic_data: bool
    run: str
    data: str  # what was scored, in words
    threshold: float
    threshold_method: str
    positive_class: str
    # every metric (accuracy, sensitivity, ... roc_auc) as {"value", "ci95"}, the confusion
    # counts, n and n_positive
    overall: dict
    per_class: dict = field(default_factory=dict)  # label -> films called positive
    per_source: dict = field(default_factory=dict)  # source -> as ``overall``
    unreadable_files: list = field(default_factory=list)  # {"path", "reason"}
    calibration: dict = field(default_factory=dict)  # expected calibration error, bins
    curves: dict | None = None  # ROC and PR curves, the operating point (both classes only)
    histogram: dict = field(default_factory=dict)  # score histogram per label
    cases: list = field(default_factory=list)  # each film: path, label, score, set, lungs
    prediction_sets: dict | None = None  # coverage per class and source (a run with sets)
    drift: dict | None = None  # the films against the validation films (a run with a gate)
    lungs: dict | None = None  # the share of heat inside the lungs
    lungs_hidden: dict | None = None  # the lungs-hidden test (a run with a lung segmenter)
    shortcut: dict | None = None  # border against centre, lungs against the rest
    contrasts: dict = field(default_factory=dict)  # view -> COVID against each other class
    classes: dict | None = None  # a model of three or more classes: its confusion matrix
    metrics_file: str = ""  # where it was written
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> Path:
        self.metrics_file = str(path)
        write_json_atomic(path, self.to_dict())
        return Path(path)

    def __getitem__(self, name: str):
        """``result["overall"]``: the dictionary access of the untyped result this replaces,
        kept for code written against it (new code reads the attributes)."""
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default=None):
        return getattr(self, name) if name in self.__dataclass_fields__ else default

    def __contains__(self, name) -> bool:
        return name in self.__dataclass_fields__ and getattr(self, name) is not None

    @classmethod
    def from_dict(cls, values: dict, source: str = "evaluation") -> "EvaluationResult":
        schema_version(values, SCHEMA_VERSION, source, "evaluation", EvaluationFileError)
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise EvaluationFileError(f"{source}: not a covidxray evaluation (missing "
                                      f"{', '.join(missing)})")
        return cls(**{**{k: v for k, v in values.items() if k in known},
                      "schema_version": SCHEMA_VERSION})

    @classmethod
    def load(cls, path: str | Path) -> "EvaluationResult":
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise EvaluationFileError(f"{path}: cannot be read ({error})") from error
        if not isinstance(values, dict):
            raise EvaluationFileError(f"{path}: not a covidxray evaluation")
        return cls.from_dict(values, str(path))
