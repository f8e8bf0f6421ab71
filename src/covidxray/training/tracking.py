"""Experiment tracking beside the run folder: MLflow (``--track mlflow[=URI]``) and TensorBoard
(``--tensorboard DIR``), both optional extras.

MLflow gets the config as parameters, every epoch's metrics as they come, then the test
metrics, the model card, the report and the run folder with its model; tags name the
backbone, the weights and the data fingerprint. TensorBoard gets every epoch's metrics as
scalars, written with TensorBoard's own event writer: Keras' TensorBoard callback needs
TensorFlow, which a torch or jax user does not have.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import json
import logging
import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import keras

from covidxray.errors import ConfigError, MissingExtraError
from covidxray.errors import UserError
from covidxray.run.folder import HISTORY

log = logging.getLogger(__name__)

MLFLOW_EXPERIMENT = "covidxray"
# a tracking server is asked at most this long before training: unreachable, training does
# not start (MLflow itself retries for minutes)
REACH_TIMEOUT_S = 5.0


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking server cannot be reached; nothing was trained."""


def check_reachable(uri: str | None, timeout: float = REACH_TIMEOUT_S) -> None:
    """Connect to an ``http(s)://`` tracking server within ``timeout`` seconds, or raise
    ``TrackingUnavailableError`` saying what to do. Local stores (a path, ``sqlite:``,
    ``file:``) need no network."""
    parsed = urlparse(uri or os.environ.get("MLFLOW_TRACKING_URI", ""))
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as error:
        raise TrackingUnavailableError(
            f"the MLflow tracking server {parsed.scheme}://{parsed.hostname}:{port} cannot be "
            f"reached ({error.strerror or error}): nothing was trained, so that no run is "
            f"missing from the record you asked for. Start the server, or record locally "
            f"(--track mlflow=sqlite:///mlflow.db) and upload later "
            f"('mlflow experiments' / 'mlflow runs' or mlflow.MlflowClient)") from error


def parse_track(value: str) -> str | None:
    """``mlflow`` (MLflow's local default store) or ``mlflow=URI``: the tracking URI, None
    for the default."""
    kind, _, uri = value.partition("=")
    if kind.strip().lower() != "mlflow":
        raise ConfigError(f"--track {value!r}: only mlflow is supported (mlflow or mlflow=URI)")
    return uri.strip() or None


def _mlflow():
    try:
        import mlflow
    except ImportError as exc:
        raise MissingExtraError("--track mlflow", "track") from exc
    return mlflow


def _scalars(logs: dict | None) -> dict[str, float]:
    return {name: float(value) for name, value in (logs or {}).items()
            if hasattr(value, "__float__")}


class _EpochMetrics(keras.callbacks.Callback):
    """Each epoch's logs, numbered across both phases, to ``log(metrics, step)``. A failure
    there (a tracking server gone mid-run) costs the record, never the training: it is
    logged once and the epochs go on."""

    def __init__(self, log):
        super().__init__()
        self.log, self.step, self.failed = log, 0, False

    def on_epoch_end(self, epoch, logs=None):
        if not self.failed:
            try:
                self.log(_scalars(logs), self.step)
            except Exception as error:  # the tracker's, whatever it is: training goes on
                self.failed = True
                log.warning("experiment tracking failed at epoch %d and is off for the rest "
                            "of this run (%s: %s); the run folder has every epoch in "
                            "%s", self.step + 1, type(error).__name__, error, HISTORY)
        self.step += 1


class MlflowTracker:
    """One MLflow run for one training run (``uri``: a tracking server or store; None for
    MLflow's default)."""

    def __init__(self, uri: str | None, config: dict, run_name: str):
        self.mlflow = _mlflow()
        check_reachable(uri)
        # MLflow retries a lost server for minutes by default: a few seconds, here
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        if uri:
            self.mlflow.set_tracking_uri(uri)
        self.mlflow.set_experiment(MLFLOW_EXPERIMENT)
        self.active = self.mlflow.start_run(run_name=run_name)
        # MLflow keeps parameters as short strings; nested settings go in as JSON
        self.mlflow.log_params({k: json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
                                for k, v in config.items()})
        self.mlflow.set_tags({"backbone": config.get("backbone"),
                              "weights": config.get("weights")})

    @property
    def run_id(self) -> str:
        return self.active.info.run_id

    def callback(self) -> keras.callbacks.Callback:
        return _EpochMetrics(lambda values, step: self.mlflow.log_metrics(values, step=step))

    def finish(self, run_dir: Path, *, metadata: dict, test_metrics: dict | None,
               report: Path | None) -> None:
        """The finished run: its tags, test metrics, model card, report and folder. A
        tracking failure here is logged: the run folder is complete either way."""
        try:
            self._finish(run_dir, metadata, test_metrics, report)
        except Exception as error:  # the tracker's, whatever it is
            log.warning("the run is complete in %s, but recording it in MLflow failed (%s: %s); "
                        "upload the folder with mlflow.log_artifacts once the server is back",
                        run_dir, type(error).__name__, error)

    def _finish(self, run_dir, metadata, test_metrics, report) -> None:
        self.mlflow.set_tags({"data_fingerprint": metadata.get("data_fingerprint"),
                              "model_id": metadata.get("model_id")})
        if test_metrics:
            self.mlflow.log_metrics({f"test_{name}": value for name, value in
                                     test_metrics.items() if value is not None})
        self.mlflow.log_dict(metadata, "model_card.json")
        if report is not None:
            self.mlflow.log_artifact(str(report))
        self.mlflow.log_artifacts(str(run_dir), "run")
        self.mlflow.end_run()

    def fail(self) -> None:
        try:
            self.mlflow.end_run(status="FAILED")
        except Exception as error:  # the server may be what failed
            log.warning("could not mark the MLflow run as failed (%s)", error)


class _TensorBoardEvents:
    """Scalars into an event file of ``log_dir``, through TensorBoard's own writer."""

    def __init__(self, log_dir: str | Path):
        try:
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as exc:
            raise MissingExtraError("--tensorboard", "track") from exc
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(log_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        summary = Summary(value=[Summary.Value(tag=f"epoch/{name}", simple_value=value)
                                 for name, value in values.items()])
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
        self.writer.flush()


def tensorboard_callback(log_dir: str | Path) -> keras.callbacks.Callback:
    """Every epoch's metrics into ``log_dir`` as TensorBoard scalars."""
    return _EpochMetrics(_TensorBoardEvents(log_dir).log)
