"""A record of every served prediction (SQLite in the run's serve folder by default, any
database SQLAlchemy reaches by URL, PostgreSQL included) and Prometheus metrics."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Boolean, Column, DateTime, Float, Integer, MetaData, String, Table, \
    create_engine

METADATA = MetaData()
PREDICTIONS = Table(
    "covidxray_predictions", METADATA,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("time", DateTime(timezone=True), nullable=False),
    Column("request_id", String(64), nullable=False, index=True),
    Column("model_id", String(128), nullable=False),
    Column("input_sha256", String(64), nullable=False),
    Column("filename", String(200)),
    Column("probability", Float),
    Column("label", String(128)),
    Column("ood", Boolean),
    Column("error", String(500)),
    Column("api_key_id", String(128)),
    # added later: a table of an older version gets them (nullable) when the record opens
    Column("verdict", String(64)),  # the prediction set in words (run.conformal)
    Column("prediction_set", String(300)),  # its classes, joined by "|"
    Column("channel", String(16)),  # "rest" (the server) or "dicom" (the DICOM node)
    Column("sop_instance_uid", String(64)),  # an instance the DICOM node received
    Column("calling_ae", String(16)),  # and the AE title that sent it
)


def default_audit_url(run_dir: Path) -> str:
    folder = Path(run_dir) / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'predictions.sqlite').resolve()}"


@dataclass
class Served:
    """One prediction as it is put on record."""

    request_id: str
    model_id: str
    input_sha256: str
    filename: str
    probability: float | None
    label: str | None
    ood: bool | None
    error: str | None
    api_key_id: str | None
    verdict: str | None = None
    prediction_set: str | None = None
    channel: str = "rest"
    sop_instance_uid: str | None = None
    calling_ae: str | None = None

    @classmethod
    def of(cls, prediction, request_id: str, model_id: str, input_sha256: str,
           api_key_id: str | None = None, **channel) -> "Served":
        """The record of a ``run.predictor.Prediction``; ``channel``: how it came (the DICOM
        node's channel, SOP Instance UID and calling AE title)."""
        return cls(request_id, model_id, prediction.input_sha256 or input_sha256,
                   prediction.path, prediction.probability, prediction.label, prediction.ood,
                   prediction.error, api_key_id, prediction.verdict,
                   None if prediction.prediction_set is None
                   else "|".join(prediction.prediction_set), **channel)


class PredictionLog:
    """Appends every served prediction to the ``covidxray_predictions`` table."""

    def __init__(self, url: str):
        self.url = url
        self.engine = create_engine(url, pool_pre_ping=True)
        METADATA.create_all(self.engine)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Columns this version records that a table made by an older one lacks (all of them
        nullable, so the old rows stay as they are)."""
        from sqlalchemy import inspect, text
        present = {c["name"] for c in inspect(self.engine).get_columns(PREDICTIONS.name)}
        missing = [c for c in PREDICTIONS.columns if c.name not in present]
        with self.engine.begin() as connection:
            for column in missing:
                kind = column.type.compile(dialect=self.engine.dialect)
                connection.execute(text(f"ALTER TABLE {PREDICTIONS.name} ADD COLUMN "
                                        f"{column.name} {kind}"))

    def record(self, served: list[Served]) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        with self.engine.begin() as connection:
            connection.execute(PREDICTIONS.insert(), [
                {"time": now, **{k: getattr(s, k) for k in Served.__dataclass_fields__}}
                for s in served])

    def rows(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(
                PREDICTIONS.select().order_by(PREDICTIONS.c.id))]


class Metrics:
    """Prometheus counters and a latency histogram; across worker processes when
    ``PROMETHEUS_MULTIPROC_DIR`` is set (``covidxray serve --workers N`` sets it)."""

    def __init__(self):
        import os

        from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
        self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(self.registry)
            registry = None  # the processes' files are read at scrape time
        else:
            registry = self.registry
        self.requests = Counter("covidxray_requests_total", "Prediction requests by outcome",
                                ["status"], registry=registry)
        self.images = Counter("covidxray_images_total", "Images scored, by label and verdict",
                              ["label", "ood"], registry=registry)
        self.errors = Counter("covidxray_image_errors_total", "Images that could not be read",
                              registry=registry)
        self.latency = Histogram("covidxray_request_seconds", "Time to answer a prediction "
                                 "request", registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
