"""Export: the run as an ONNX model run by onnxruntime alone, with the same answers."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import CXR_DEV

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    import covidxray
    out = tmp_path_factory.mktemp("export") / "onnx"
    record = covidxray.export(tiny_run, out)
    return out, record


def real_xrays() -> list[str]:
    """A few real X-rays of each class where the shared data is present."""
    rows = list(csv.DictReader(open(CXR_DEV / "manifest.csv"))) if CXR_DEV.exists() else []
    picked = [r for label in ("COVID", "NORMAL", "PNEUMONIA")
              for r in [r for r in rows if r["label"] == label][:4]]
    return [str(CXR_DEV / r["file"]) for r in picked]


def test_the_exported_model_gives_the_runs_answers(tiny_run, tiny_data, exported):
    import covidxray
    out, record = exported
    assert record["parity_max_abs_difference"] < 1e-4
    assert json.loads((out / "export.json").read_text())["model_id"] == \
        json.loads((tiny_run / "metadata.json").read_text())["model_id"]
    files = sorted(map(str, (tiny_data / "COVID").glob("*.png")))[:4] + real_xrays()
    keras_run, onnx_run = covidxray.load(tiny_run), covidxray.load(out)
    assert onnx_run.model is None
    for ours, theirs in zip(onnx_run.predict(files, heatmap=True),
                            keras_run.predict(files, heatmap=True)):
        assert ours.probability == pytest.approx(theirs.probability, abs=1e-4)
        assert ours.ood == theirs.ood
        if abs(theirs.probability - keras_run.threshold) > 1e-4:  # else a rounding decides
            assert ours.label == theirs.label
        np.testing.assert_allclose(ours.heatmap, theirs.heatmap, atol=1e-3)


NO_KERAS = """
import sys
import covidxray
from fastapi.testclient import TestClient
from covidxray.deploy.serve.app import create_app
from covidxray.config import ServeConfig
predictor = covidxray.load(sys.argv[1])
prediction = predictor.predict(sys.argv[2], heatmap=True)
assert prediction.error is None and prediction.heatmap is not None, prediction
settings = ServeConfig(allowed_hosts=("testserver",), audit_db="sqlite:///" + sys.argv[3])
client = TestClient(create_app(sys.argv[1], settings=settings))
response = client.post("/api/predict", files=[("files", ("x.png", open(sys.argv[2], "rb")))])
assert response.status_code == 200, response.text
heavy = {"keras", "torch", "jax", "tensorflow"} & {m.split(".")[0] for m in sys.modules}
assert not heavy, heavy
"""


def test_predict_and_serve_it_import_no_deep_learning_library(exported, tiny_data, tmp_path):
    out, _ = exported
    image = sorted((tiny_data / "COVID").glob("*.png"))[0]
    subprocess.run([sys.executable, "-c", NO_KERAS, str(out), str(image),
                    str(tmp_path / "record.sqlite")], check=True)


def test_the_command_line_exports_and_predicts(tiny_run, tiny_data, tmp_path, capsys):
    from covidxray.cli import main
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "m")]) == 0
    assert "onnxruntime alone" in capsys.readouterr().out
    image = sorted((tiny_data / "COVID").glob("*.png"))[0]
    assert main(["predict", str(tmp_path / "m"), str(image), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["predictions"][0]["probability"] is not None


PREDICT_ONLY = """
import sys
from covidxray.cli import main
code = main(["predict", sys.argv[1], sys.argv[2], "--json"])
loaded = {m.split(".")[0] for m in sys.modules}
heavy = {"keras", "torch", "jax", "tensorflow", "sklearn", "scipy", "skimage"} & loaded
assert code == 0 and not heavy, (code, heavy)
"""


def test_predict_of_an_exported_model_imports_only_what_it_uses(exported, tiny_data):
    """The whole 'covidxray predict' of one file: no deep-learning library, and neither
    scikit-learn nor scipy (they cost every user a second and more on each call)."""
    out, _ = exported
    image = sorted((tiny_data / "COVID").glob("*.png"))[0]
    done = subprocess.run([sys.executable, "-c", PREDICT_ONLY, str(out), str(image)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["predictions"][0]["lungs_found"] is not None


def test_export_never_overwrites_another_run(tiny_run, own_run, tmp_path, capsys):
    """An export over a run (or anything but an earlier export of the same run) is refused and
    leaves it as it was; --force replaces it whole; the same run again replaces its export."""
    from covidxray.cli import main
    before = {p.name: p.read_bytes() for p in own_run.iterdir() if p.is_file()}
    assert main(["export", str(tiny_run), "--out", str(own_run)]) == 1
    assert "holds a run: export to a new or empty folder, or pass --force" in \
        capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in own_run.iterdir() if p.is_file()} == before
    out = tmp_path / "again"
    first = covidxray_export(tiny_run, out)
    second = covidxray_export(tiny_run, out)  # an earlier export of the same run: replaced
    assert first["model_id"] == second["model_id"]
    assert main(["export", str(tiny_run), "--out", str(own_run), "--force"]) == 0
    assert not (own_run / "model.keras").exists() and (own_run / "model.onnx").is_file()


def covidxray_export(run, out):
    import covidxray
    return covidxray.export(run, out)


def test_a_truncated_or_swapped_model_onnx_is_named(exported, tmp_path):
    import shutil

    from covidxray.run.predictor import Predictor, RunError
    out, record = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert record["onnx_sha256"] and Predictor.load(copy).model is None
    onnx = copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[: onnx.stat().st_size // 2])
    with pytest.raises(RunError, match="model.onnx does not match this export"):
        Predictor.load(copy)
