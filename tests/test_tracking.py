"""Experiment tracking against the real libraries: a local MLflow store (SQLite) and the
TensorBoard event files read back with TensorBoard's own reader."""

import json

import pytest

from covidxray.cli import main
from tests.conftest import TINY_TRAIN

mlflow = pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _cli_options(options: dict) -> list[str]:
    argv = []
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def test_train_tracks_to_mlflow_and_tensorboard(tiny_data, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.chdir(tmp_path)  # MLflow writes its artifacts beside the working directory
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--quiet",
                 "--track", f"mlflow={store}", "--tensorboard", str(tmp_path / "tb"),
                 *_cli_options(TINY_TRAIN)]) == 0

    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("covidxray")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "mobilenetv3small"
    assert run.data.params["image_size"] == "64"
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert run.data.tags["data_fingerprint"] == metadata["data_fingerprint"]
    assert run.data.tags["weights"] == "none"
    epochs = client.get_metric_history(run.info.run_id, "val_auc")
    assert [m.step for m in epochs] == [0, 1]  # one epoch of each phase, numbered on
    assert {m.value for m in client.get_metric_history(run.info.run_id, "phase")} == {1, 2}
    test_metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert run.data.metrics["test_roc_auc"] == pytest.approx(
        test_metrics["overall"]["metrics"]["roc_auc"]["value"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model_card.json", "report.html", "run"} <= artifacts
    stored = {a.path for a in client.list_artifacts(run.info.run_id, "run")}
    assert {"run/model.keras", "run/metadata.json", "run/history.csv"} <= stored

    scalars = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in scalars.Scalars("epoch/val_auc")] == [0, 1]
    assert scalars.Scalars("epoch/loss")[0].value > 0


def test_track_names_what_it_supports(tiny_data, tmp_path, capsys):
    assert main(["train", str(tiny_data), "--out", str(tmp_path / "run"),
                 "--track", "wandb"]) == 1
    assert "only mlflow is supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_unreachable_tracking_server_stops_before_training(tiny_data, tmp_path, capsys):
    """Nothing listens on the port: one line saying so within seconds (MLflow alone retries
    for minutes), nothing trained."""
    import socket
    import time
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code = main(["train", str(tiny_data), "--out", str(tmp_path / "run"), "--quiet",
                 "--track", f"mlflow=http://127.0.0.1:{port}", *_cli_options(TINY_TRAIN)])
    assert code == 1 and time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert f"tracking server http://127.0.0.1:{port} cannot be reached" in err
    assert "nothing was trained" in err and not (tmp_path / "run" / "config.json").exists()


def test_tracking_that_fails_mid_run_costs_the_record_not_the_training(tiny_data, tmp_path,
                                                                       caplog):
    from covidxray.config import TrainConfig
    from covidxray.training.fit import train
    from covidxray.training.tracking import _EpochMetrics
    calls = []

    def gone(values, step):
        calls.append(step)
        raise ConnectionError("server went away")

    config = TrainConfig(data=str(tiny_data), out=str(tmp_path / "run"), **TINY_TRAIN)
    with caplog.at_level("WARNING"):
        run = train(config, verbose=0, callbacks=(_EpochMetrics(gone),))
    assert (run / "model.keras").is_file()
    assert calls == [0]  # tried once, then left alone
    assert "experiment tracking failed at epoch 1 and is off for the rest of this run " \
           "(ConnectionError: server went away)" in caplog.text
