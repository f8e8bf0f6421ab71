"""One prediction, one record: ``Prediction``. Every output format derives from its fields: the
rows of an archive's CSV file and their Parquet schema (``deploy.batch``), the prediction
record's database table (``deploy.records``), the REST answer's fields
(``deploy.serve.app``) and what the DICOM node's report carries (``deploy.dicom.results``).
A field added here appears in all of them.

Each record field says in its metadata how it is kept flat (``column``): ``text``, ``float``,
``bool``, ``set`` (a list of class names, joined by "|" in a flat row) or ``json`` (a mapping,
as JSON text), with a size for databases. Fields without that metadata (the heat map, the
image, the lungs found) are kept in memory only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

SET_SEPARATOR = "|"  # a prediction set in a flat row: "NON-COVID|COVID"


def column(kind: str, size: int | None = None) -> dict:
    """A record field's metadata: how it is kept flat (``kind``), and its size in a database
    (text)."""
    return {"column": kind, "size": size}


@dataclass
class Prediction:
    """One input's result; ``error`` is set (and the rest None) when it could not be read."""

    path: str = field(metadata=column("text", 1000))
    probability: float | None = field(default=None, metadata=column("float"))
    # None for a film the gate flags (no call is made) and for an error
    label: str | None = field(default=None, metadata=column("text", 128))
    positive: bool | None = field(default=None, metadata=column("bool"))
    ood: bool | None = field(default=None, metadata=column("bool"))  # None: no gate
    ood_reason: str | None = field(default=None, metadata=column("text", 1000))
    error: str | None = field(default=None, metadata=column("text", 500))
    # of the file's bytes (an array's pixels); None: unread
    input_sha256: str | None = field(default=None, metadata=column("text", 64))
    # the conformal prediction set at the run's confidence, and it in words: a class,
    # "uncertain: refer" (both), "unlike the calibration data" (neither) or, for a film the
    # gate flags, "not a frontal chest X-ray: no verdict" (an empty set); None: no sets
    prediction_set: list[str] | None = field(default=None, metadata=column("set", 300))
    verdict: str | None = field(default=None, metadata=column("text", 64))
    # an ensemble's: the members' standard deviation
    member_spread: float | None = field(default=None, metadata=column("float"))
    # a model of three or more classes: each one's probability (P(COVID) is ``probability``)
    class_probabilities: dict[str, float] | None = field(default=None,
                                                        metadata=column("json", 500))
    # the gate's feature distance of the input to the training films (a batch's drift test)
    feature_distance: float | None = field(default=None, metadata=column("float"))
    lungs_found: bool | None = field(default=None, metadata=column("bool"))  # None: no segmenter
    # with heat maps asked for: the share of the heat inside the lungs found (None: none found)
    lung_heat_share: float | None = field(default=None, metadata=column("float"))
    # with heat maps asked for: Grad-CAM in [0, 1] on the input's own pixels (zero where the
    # run's crop cut), and the input as the model read it, gray in [0, 1]
    heatmap: np.ndarray | None = field(default=None, repr=False, compare=False)
    image: np.ndarray | None = field(default=None, repr=False, compare=False)
    lungs: object | None = field(default=None, repr=False, compare=False)  # its LungField

    def to_dict(self) -> dict:
        """The record's fields with their values (lists and mappings as they are)."""
        return {f.name: getattr(self, f.name) for f in record_fields(type(self))}

    def row(self) -> dict:
        """The record flat: a set joined by ``SET_SEPARATOR``, a mapping as JSON text."""
        return {f.name: flat(f.metadata["column"], getattr(self, f.name))
                for f in record_fields(type(self))}


def record_fields(record: type = Prediction) -> list[dataclasses.Field]:
    """The fields of ``record`` that are kept (those with ``column`` metadata), in order."""
    return [f for f in dataclasses.fields(record) if "column" in f.metadata]


def flat(kind: str, value):
    """One field's value as a flat row keeps it."""
    if value is None:
        return None
    if kind == "set":
        return SET_SEPARATOR.join(value)
    if kind == "json":
        return json.dumps(value)
    return value


def arrow_schema(extra: list[tuple[str, str]] = (), record: type = Prediction):
    """The Parquet schema of flat rows of ``record``, then ``extra`` (name, kind) columns."""
    import pyarrow as pa
    types = {"text": pa.string(), "set": pa.string(), "json": pa.string(),
             "float": pa.float64(), "bool": pa.bool_()}
    return pa.schema([(f.name, types[f.metadata["column"]]) for f in record_fields(record)]
                     + [(name, types[kind]) for name, kind in extra])


def sql_columns(record: type = Prediction, leave_out: tuple[str, ...] = ()) -> list:
    """SQLAlchemy columns of the record's fields (all nullable), but those left out."""
    from sqlalchemy import Boolean, Column, Float, String, Text
    types = {"float": Float, "bool": Boolean}
    return [Column(f.name, types[f.metadata["column"]]() if f.metadata["column"] in types else
                   String(f.metadata["size"]) if f.metadata["size"] else Text())
            for f in record_fields(record) if f.name not in leave_out]


def api_fields(record: type = Prediction) -> dict:
    """The record's fields as pydantic field definitions (their type, default None), for a
    REST model built from them."""
    import typing
    hints = typing.get_type_hints(record)
    return {f.name: (hints[f.name], None) for f in record_fields(record)}
