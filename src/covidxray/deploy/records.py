"""The prediction record: every prediction the server or the DICOM node answers, put on record
before it is answered (SQLite in the run's serve folder by default, any database SQLAlchemy
reaches by URL, PostgreSQL included)."""

from __future__ import annotations

import datetime
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from covidxray.errors import MissingExtraError, UserError
from covidxray.run.folder import RunFolder
from covidxray.run.record import Prediction, sql_columns

log = logging.getLogger(__name__)

TABLE = "covidxray_predictions"


def predictions_table(record: type = Prediction) -> Table:
    """The record's table: when and how each prediction was served (the context), then the
    prediction's own fields (``run.record``; the served file's name is ``filename``). Columns
    a table made by an older version lacks are added, nullable, when the record opens."""
    return Table(
        TABLE, MetaData(),
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("time", DateTime(timezone=True), nullable=False),
        Column("request_id", String(64), nullable=False, index=True),
        Column("model_id", String(128), nullable=False),
        Column("filename", String(200)),
        Column("api_key_id", String(128)),
        Column("channel", String(16)),  # "rest" (the server) or "dicom" (the DICOM node)
        Column("sop_instance_uid", String(64)),  # an instance the DICOM node received
        Column("calling_ae", String(16)),  # and the AE title that sent it
        *sql_columns(record, leave_out=("path",)))


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def default_audit_url(run_dir: Path) -> str:
    folder = RunFolder(run_dir).serve_folder
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'predictions.sqlite').resolve()}"


@dataclass
class Served:
    """One prediction as it is put on record, with how it was served."""

    prediction: Prediction
    request_id: str
    model_id: str
    input_sha256: str  # of what was received (the prediction's own, where it was read)
    api_key_id: str | None = None
    channel: str = "rest"
    sop_instance_uid: str | None = None
    calling_ae: str | None = None

    def row(self, time: datetime.datetime) -> dict:
        values = self.prediction.row()
        return {**{k: v for k, v in values.items() if k != "path"}, "time": time,
                "request_id": self.request_id, "model_id": self.model_id,
                "input_sha256": values["input_sha256"] or self.input_sha256,
                "filename": Path(values["path"]).name[:200], "api_key_id": self.api_key_id,
                "channel": self.channel, "sop_instance_uid": self.sop_instance_uid,
                "calling_ae": self.calling_ae}


class RecordUnavailable(UserError, RuntimeError):
    """The prediction record cannot be written (the message says why): nothing is answered
    that is not on record."""


class PredictionLog:
    """Appends every served prediction to the ``covidxray_predictions`` table.

    A SQLite file moved or removed under a running server (log rotation, a clean-up) is noticed
    before the next write: the record starts a new file where the old one was, and says so in
    the log. A record that cannot be written at all raises ``RecordUnavailable``."""

    def __init__(self, url: str, record: type = Prediction):
        self.url = url
        database = make_url(url).database if url.startswith("sqlite") else None
        self.file = Path(database) if database and database != ":memory:" else None
        self.problem: str | None = None  # why the last write failed (None: it did not)
        self.table = predictions_table(record)
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        if self.file is not None:
            self.file.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = create_engine(self.url, pool_pre_ping=True)
        except ModuleNotFoundError as error:  # a PostgreSQL URL without its driver
            raise MissingExtraError(f"the prediction record at {make_url(self.url).drivername}",
                                    "postgres") from error
        self.table.metadata.create_all(self.engine)
        self._add_missing_columns()
        self._identity = self._file_identity()

    def _file_identity(self):
        try:
            info = os.stat(self.file) if self.file is not None else None
        except OSError:
            return None
        return None if info is None else (info.st_dev, info.st_ino)

    def _reopen_if_moved(self) -> None:
        if self.file is None or self._file_identity() == self._identity:
            return
        log.warning("the prediction record %s was moved or removed: a new one is started "
                    "there (the earlier predictions are in the file that was moved)", self.file)
        self.engine.dispose()
        self._open()

    def _write(self, rows: list[dict]) -> None:
        self._reopen_if_moved()
        with self.engine.begin() as connection:
            connection.execute(self.table.insert(), rows)

    def check(self) -> str | None:
        """Why the record cannot be written now (None: it can), for ``/health``."""
        with self._lock:
            try:
                self._reopen_if_moved()
                with self.engine.connect() as connection:
                    connection.execute(text("SELECT 1"))
                self.problem = None
            except (SQLAlchemyError, OSError) as error:
                self.problem = _why(error)
            return self.problem

    def _add_missing_columns(self) -> None:
        """Columns this version records that a table made by an older one lacks (all of them
        nullable, so the old rows stay as they are)."""
        from sqlalchemy import inspect, text
        present = {c["name"] for c in inspect(self.engine).get_columns(TABLE)}
        missing = [c for c in self.table.columns if c.name not in present]
        with self.engine.begin() as connection:
            for column in missing:
                kind = column.type.compile(dialect=self.engine.dialect)
                connection.execute(text(f"ALTER TABLE {TABLE} ADD COLUMN "
                                        f"{column.name} {kind}"))

    def record(self, served: list[Served]) -> None:
        """Put ``served`` on record, or raise ``RecordUnavailable`` (one fresh start of the
        database connection is tried first)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        rows = [s.row(now) for s in served]
        with self._lock:
            try:
                self._write(rows)
            except (SQLAlchemyError, OSError) as first:
                log.warning("the prediction record %s failed (%s): reconnecting", self.url,
                            _why(first))
                try:
                    self.engine.dispose()
                    self._open()
                    self._write(rows)
                except (SQLAlchemyError, OSError) as error:
                    self.problem = _why(error)
                    raise RecordUnavailable(f"the prediction record cannot be written "
                                            f"({self.problem})") from error
            self.problem = None

    def rows(self) -> list[dict]:
        with self.engine.connect() as connection:
            return [dict(row._mapping) for row in connection.execute(
                self.table.select().order_by(self.table.c.id))]
