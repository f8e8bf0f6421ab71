"""Ensembles as one run: trained as K seeds on one split or built from runs, taken by every
command, exported as a folder of members that onnxruntime runs."""

import json

import numpy as np
import pytest
from conftest import TINY_TRAIN
from PIL import Image

import covidxray
from covidxray.run.ensemble import EnsembleError


@pytest.fixture(scope="module")
def step_calls() -> list[str]:
    """Who took the validation step (training.calibrate) while the ensemble trained."""
    return []


@pytest.fixture(scope="module")
def ensemble_run(tiny_data, tmp_path_factory, step_calls):
    from covidxray.training import calibrate, ensemble, finalize

    def spy(caller):
        def step(*args, **kwargs):
            step_calls.append(caller)
            return calibrate.calibrate_and_gate(*args, **kwargs)
        return step
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finalize, "calibrate_and_gate", spy("run"))
        patch.setattr(ensemble, "calibrate_and_gate", spy("ensemble"))
        return covidxray.train(tiny_data, tmp_path_factory.mktemp("ens") / "ens", verbose=0,
                               ensemble=2, **TINY_TRAIN)


@pytest.mark.slow
def test_an_ensemble_answers_on_onnxruntime_as_on_keras(ensemble_run, tiny_data):
    pytest.importorskip("onnxruntime")
    from test_runtime import assert_same_answers, films
    assert_same_answers(ensemble_run, films(tiny_data))


def test_an_ensemble_is_a_run_every_command_takes(ensemble_run, tiny_data, tmp_path):
    meta = covidxray.api.metadata(ensemble_run)
    assert meta.members == ["members/0", "members/1"] and meta.model_id.startswith("ensemble2")
    members = [covidxray.load(ensemble_run / m) for m in meta.members]
    assert [json.loads((ensemble_run / m / "config.json").read_text())["seed"]
            for m in meta.members] == [0, 1]
    assert (ensemble_run / "members/0/split.csv").read_text() == \
        (ensemble_run / "members/1/split.csv").read_text()  # one split
    predictor = covidxray.load(ensemble_run)
    files = sorted(map(str, (tiny_data / "COVID").glob("*.png")))[:3]
    ours = predictor.predict(files, heatmap=True)
    for i, prediction in enumerate(ours):
        each = [m.predict(files[i]).probability for m in members]
        assert prediction.probability == pytest.approx(np.mean(each), abs=1e-5)
        assert prediction.member_spread == pytest.approx(np.std(each), abs=1e-5)
        assert prediction.heatmap.shape == np.asarray(Image.open(files[i])).shape
        assert prediction.verdict is not None and prediction.ood is not None
    metrics = covidxray.evaluate(ensemble_run, bootstrap=20, shortcut_images=8)
    assert set(metrics["prediction_sets"]["per_class"]) <= {"COVID", "NON-COVID"}
    assert metrics["overall"]["n"] == sum(meta.split_counts["test"].values())
    report = covidxray.report(ensemble_run, tmp_path / "r.html")
    assert "An ensemble of 2" in report.read_text()


@pytest.mark.slow
def test_runs_and_ensembles_take_one_validation_step_and_rebuild_the_same(ensemble_run,
                                                                           step_calls,
                                                                           tmp_path):
    """Each member (training.finalize) and the ensemble (training.ensemble) choose their
    threshold, temperature, gate and sets in the one step; the ensemble built again from its
    members chooses them as training did."""
    from covidxray.run.conformal import ConformalSets
    from covidxray.run.folder import RunFolder
    from covidxray.run.ood import OODGate
    assert step_calls == ["run", "run", "ensemble"]
    meta = covidxray.api.metadata(ensemble_run)
    again = covidxray.api.ensemble([ensemble_run / m for m in meta.members], tmp_path / "e")
    rebuilt = covidxray.api.metadata(again)
    assert rebuilt.threshold == pytest.approx(meta.threshold, abs=1e-6)
    assert (rebuilt.temperature, rebuilt.confidence, rebuilt.threshold_method) == \
        (meta.temperature, meta.confidence, meta.threshold_method)
    assert rebuilt.validation_metrics == pytest.approx(meta.validation_metrics, abs=1e-6,
                                                       nan_ok=True)
    sets = [ConformalSets.load(RunFolder(run).sets_file) for run in (ensemble_run, again)]
    assert sets[0].classes == sets[1].classes and sets[0].confidence == sets[1].confidence
    for ours, theirs in zip(sets[0].calibration, sets[1].calibration):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    gates = [OODGate.load(RunFolder(run).gate_file) for run in (ensemble_run, again)]
    assert gates[0].embedding_threshold == pytest.approx(gates[1].embedding_threshold, rel=1e-5)
    assert gates[0].layout_threshold == pytest.approx(gates[1].layout_threshold, rel=1e-5)


@pytest.mark.slow
def test_an_exported_ensemble_runs_on_onnxruntime_alone(ensemble_run, tiny_data, tmp_path):
    pytest.importorskip("onnxruntime")
    record = covidxray.export(ensemble_run, tmp_path / "onnx")
    assert record["parity_max_abs_difference"] < 1e-4 and set(record["members"]) == {
        "members/0", "members/1"}
    exported = covidxray.load(tmp_path / "onnx")
    image = sorted(map(str, (tiny_data / "COVID").glob("*.png")))[0]
    assert exported.predict(image).probability == pytest.approx(
        covidxray.load(ensemble_run).predict(image).probability, abs=1e-4)


def test_runs_that_are_not_one_question_are_refused(tiny_run, tmp_path):
    with pytest.raises(EnsembleError, match="at least 2"):
        covidxray.api.ensemble([tiny_run], tmp_path / "e")
    data = json.loads((tiny_run / "config.json").read_text())["data"]
    other = covidxray.train(data, tmp_path / "big", verbose=0, **{**TINY_TRAIN, "image_size": 96})
    with pytest.raises(EnsembleError, match="share the image size and the crop"):
        covidxray.api.ensemble([tiny_run, other], tmp_path / "e")
