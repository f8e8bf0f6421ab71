"""The run folder's contract: ``RunMetadata``, written once by training, validated on load.

``metadata.json`` carries a ``schema_version``. Version 1 (runs of covidxray before the typed
contract: no version field, the preprocessing as a dict beside ``image_size``) is read and
converted; a version newer than this code knows is refused with a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from covidxray.errors import UserError
from covidxray.config import FILL_MODES, INTENSITY_MODES, LUNG_FALLBACK_CROP, RESEARCH_NOTICE, \
    Preprocessing, check_crop
from covidxray.fileutil import schema_version, write_json_atomic

SCHEMA_VERSION = 2


class RunError(UserError, FileNotFoundError):
    """A folder that is not a complete run, or a run this version cannot read."""


@dataclass(frozen=True)
class RunMetadata:
    """What a trained run is, for everything that uses it."""

    class_names: list[str]
    positive_class: str
    preprocessing: Preprocessing
    backbone: str
    weights: str  # "imagenet", "none" or the path of a weights file
    threshold: float  # P(positive) at or above it: the positive class; frozen on validation
    threshold_method: str
    model_id: str  # unique per run: names the backbone, the size and a hash of the weights
    data_fingerprint: str  # sha256 over the training and validation files
    created: str
    covidxray_version: str
    backend: str
    versions: dict[str, str] = field(default_factory=dict)
    target_sensitivity: float | None = None
    temperature: float | None = None  # temperature scaling fitted on validation, if any
    test_time_views: int = 0  # source-cue views averaged with each image's own score
    confidence: float | None = None  # of the prediction sets (run.conformal); None: no sets
    # an ensemble: its member run folders, relative to its own (run.ensemble); each prepares
    # its own input, ``preprocessing`` is the first member's
    members: list[str] = field(default_factory=list)
    # members may lie outside the ensemble's folder (absolute paths); they are listed wherever
    # the ensemble is evaluated or reported
    external_members: bool = False
    # a softmax head's classes, in the order of its outputs (empty: one sigmoid unit)
    output_classes: list[str] = field(default_factory=list)
    validation_metrics: dict[str, float] = field(default_factory=dict)
    split_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    unreadable_training_files: int = 0
    sources_left_out: dict[str, str] = field(default_factory=dict)  # source -> why
    synthetic_data: bool = False
    dtype_policy: str = "float32"
    # which phase's weights were kept, on what data and evidence (training.fit.selection_record)
    selection: dict = field(default_factory=dict)
    no_lungs_in_training: int = 0  # lung crop: training images cropped by the fallback
    # per training source with both classes: how well thumbnails, grey-level histograms and
    # sizes alone separate its classes, as the files are and as the run prepares them
    image_statistics: dict = field(default_factory=dict)
    data_root: str = ""  # where the training data was; private: never served
    notice: str = RESEARCH_NOTICE
    schema_version: int = SCHEMA_VERSION

    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def positive_index(self) -> int:
        """The positive class's output of a softmax head (0 for one sigmoid unit)."""
        return self.output_classes.index(self.positive_class) if self.output_classes else 0

    @property
    def negative_classes(self) -> list[str]:
        return [c for c in self.class_names if c != self.positive_class]

    @property
    def negative_label(self) -> str:
        negatives = self.negative_classes
        return negatives[0] if len(negatives) == 1 else f"NON-{self.positive_class.upper()}"

    def label_of(self, probability: float) -> str:
        return self.positive_class if probability >= self.threshold else self.negative_label

    def preprocessing_steps(self) -> list[str]:
        """The pixel steps in words."""
        p = self.preprocessing
        return ["decode to grayscale in [0, 1] (DICOM: modality LUT, VOI LUT, MONOCHROME1 "
                "inverted)",
                *([f"crop to the box of the lungs found by the lung segmenter, with a margin "
                   f"(no plausible lungs: {LUNG_FALLBACK_CROP:.0%} off each side)"]
                  if p.lung_crop else [f"crop {p.crop:.0%} off each side"] if p.crop else []),
                *([f"intensity: {p.intensity}"] if p.intensity != "none" else []),
                *(["everything but the lungs found (grown by 3% of the side) filled with the "
                   "film's mean grey level (no plausible lungs: nothing filled)"]
                  if p.fill == "outside-lungs" else []),
                f"bilinear resize to {p.image_size}x{p.image_size}", "quantise to uint8 0..255",
                f"in the model: gray to 3 channels, then the {self.backbone} weights' own "
                f"input scaling"]

    def to_dict(self) -> dict:
        """The JSON form; ``image_size`` and ``negative_classes`` are repeated for readers
        without covidxray (and ignored on load)."""
        return {**dataclasses.asdict(self), "image_size": self.image_size,
                "negative_classes": self.negative_classes}

    def public_dict(self) -> dict:
        """What may leave the machine (the server's model card): no local paths."""
        values = self.to_dict()
        del values["data_root"]
        if Path(self.weights).is_absolute():
            values["weights"] = Path(self.weights).name
        return values

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_dict(cls, values: dict, source: str = "metadata") -> "RunMetadata":
        """Validated: every required field present with the right type; version 1 converted."""
        version = schema_version(values, SCHEMA_VERSION, source, "run", RunError)
        if version == 1:
            values = _from_version_1(values)
        known = {f.name: f for f in dataclasses.fields(cls)}
        missing = [name for name, f in known.items() if name not in values
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RunError(f"{source}: not a covidxray run's metadata (missing "
                           f"{', '.join(missing)})")
        values = {k: v for k, v in values.items() if k in known}
        preprocessing = values["preprocessing"]
        try:
            values["preprocessing"] = Preprocessing(**preprocessing) \
                if isinstance(preprocessing, dict) else preprocessing
            metadata = cls(**values)
            _check_types(metadata)
        except (TypeError, ValueError) as error:
            raise RunError(f"{source}: invalid run metadata: {error}") from error
        return metadata

    @classmethod
    def load(cls, path: str | Path) -> "RunMetadata":
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RunError(f"{path}: cannot read the run's metadata ({error})") from error
        if not isinstance(values, dict):
            raise RunError(f"{path}: not a covidxray run's metadata")
        return cls.from_dict(values, str(path))


def _check_types(metadata: RunMetadata) -> None:
    """Every field a prediction reads, of its type and in its range; the first one that is
    not is named."""
    checks = {"threshold": (int, float), "positive_class": str, "class_names": list,
              "backbone": str, "model_id": str, "test_time_views": int, "members": list,
              "output_classes": list}
    for name, kind in checks.items():
        value = getattr(metadata, name)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise TypeError(f"field {name}: {value!r} is not a {_kind_name(kind)}")
    p = metadata.preprocessing
    ranges = [
        ("threshold", 0 <= metadata.threshold <= 1, "a probability in [0, 1]"),
        ("test_time_views", metadata.test_time_views >= 0, "a count, 0 or more"),
        ("temperature", metadata.temperature is None or (
            isinstance(metadata.temperature, (int, float)) and math.isfinite(
                metadata.temperature) and metadata.temperature > 0), "a number above 0"),
        ("confidence", metadata.confidence is None or (
            isinstance(metadata.confidence, (int, float)) and 0 < metadata.confidence < 1),
         "in (0, 1)"),
        ("preprocessing.image_size", isinstance(p.image_size, int) and 1 <= p.image_size
         <= 4096, "a size in pixels, 1 to 4096"),
        ("preprocessing.intensity", p.intensity in INTENSITY_MODES, f"one of {INTENSITY_MODES}"),
        ("preprocessing.fill", p.fill in FILL_MODES, f"one of {FILL_MODES}"),
        ("positive_class", metadata.positive_class in metadata.class_names,
         f"one of class_names {metadata.class_names}"),
        ("members", all(isinstance(m, str) and m for m in metadata.members),
         "folder names"),
    ]
    for name, ok, expected in ranges:
        if not ok:
            value = getattr(p, name.split(".")[1]) if name.startswith("preprocessing.") \
                else getattr(metadata, name)
            raise ValueError(f"field {name}: {value!r} is not {expected}")
    try:
        check_crop(p.crop)
    except ValueError as error:
        raise ValueError(f"field preprocessing.crop: {error}") from None
    if metadata.output_classes and metadata.positive_class not in metadata.output_classes:
        raise ValueError(f"field output_classes: {metadata.output_classes} lacks the positive "
                         f"class {metadata.positive_class!r}")


def _kind_name(kind) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({int: "whole number", float: "number", str: "text", list: "list"}.get(
        k, k.__name__) for k in kinds)


def _from_version_1(values: dict) -> dict:
    """A run written before the typed contract."""
    values = dict(values)
    steps = values.get("preprocessing") or {}
    values["preprocessing"] = Preprocessing(int(values.get("image_size", 0)),
                                            steps.get("intensity", "none"),
                                            float(steps.get("crop", 0.0)))
    # the id those versions served: not unique per run (issue 16); kept so it still matches
    values.setdefault("model_id", f"{values.get('backbone')}-{values.get('image_size')}px-"
                                  f"{str(values.get('data_fingerprint', ''))[:12]}")
    values["schema_version"] = SCHEMA_VERSION
    return values
