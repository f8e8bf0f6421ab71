"""Keras trains, onnxruntime answers: a trained run's classifier is exported once into the
cache and run by onnxruntime alone (no Keras, PyTorch or JAX imported), with the answers of
the Keras model within 1e-4: single runs, pooled stages, three classes (tests/test_classes.py)
and ensembles (tests/test_ensemble.py)."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import CXR_DEV, TINY_TRAIN

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import covidxray  # noqa: E402
from covidxray.run.engines import KerasEngine, OnnxEngine  # noqa: E402


def films(tiny_data, n: int = 6) -> list[str]:
    """Real X-rays where the shared data is present (both classes), else drawn ones."""
    real = sorted(CXR_DEV.glob("COVID/*.png"))[:n // 2] + sorted(CXR_DEV.glob("NORMAL/*.png"))[
        :n // 2] if CXR_DEV.exists() else []
    return [str(p) for p in real] or [str(p) for p in sorted(tiny_data.rglob("*.png"))[:n]]


def assert_same_answers(run, paths, tolerance=1e-4):
    """The run on onnxruntime (the default) and on Keras: the same scores, maps and sets."""
    on_onnx = covidxray.load(run)
    on_keras = covidxray.load(run, runtime="keras")
    engines = [m.engine for m in on_onnx.engine.members] \
        if hasattr(on_onnx.engine, "members") else [on_onnx.engine]
    assert all(isinstance(engine, OnnxEngine) for engine in engines)
    onnx, keras = on_onnx.predict(paths, heatmap=True), on_keras.predict(paths, heatmap=True)
    for a, b in zip(onnx, keras):
        assert a.probability == pytest.approx(b.probability, abs=tolerance), a.path
        assert a.verdict == b.verdict and a.ood == b.ood
        assert np.max(np.abs(a.heatmap - b.heatmap)) < 1e-3
    return on_onnx, on_keras


def test_a_run_answers_on_onnxruntime_as_on_keras(tiny_run, tiny_data):
    on_onnx, on_keras = assert_same_answers(tiny_run, films(tiny_data))
    assert isinstance(on_keras.engine, KerasEngine) and on_onnx.model is None


@pytest.mark.slow
def test_pooled_stages_answer_on_onnxruntime_as_on_keras(tiny_data, tmp_path):
    run = covidxray.train(tiny_data, tmp_path / "pooled", verbose=0,
                          **{**TINY_TRAIN, "pooled_stages": 2})
    assert_same_answers(run, films(tiny_data))


def test_predict_imports_no_deep_learning_library(tiny_run, tiny_data):
    """Once the export is in the cache, 'covidxray predict RUN film' loads neither Keras nor
    PyTorch nor JAX, and answers as before."""
    film = films(tiny_data, 2)[0]
    expected = covidxray.load(tiny_run).predict(film).probability  # exports, if not yet
    code = ("import sys, json; from covidxray.cli import main; "
            f"code = main(['predict', {str(tiny_run)!r}, {film!r}, '--json']); "
            "heavy = [m for m in ('keras', 'torch', 'jax', 'tensorflow') if m in sys.modules]; "
            "print(json.dumps(heavy)); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    answer, heavy = done.stdout.rsplit("\n", 2)[0], json.loads(done.stdout.splitlines()[-1])
    assert heavy == []
    assert json.loads(answer)["predictions"][0]["probability"] == pytest.approx(expected,
                                                                                abs=1e-6)


def test_a_cache_that_cannot_be_written_or_is_damaged_still_answers(tiny_run, tiny_data,
                                                                     readonly_folder,
                                                                     monkeypatch, caplog):
    from covidxray.model import runtime
    film = films(tiny_data, 2)[0]
    expected = covidxray.load(tiny_run).predict(film).probability
    monkeypatch.setenv("COVIDXRAY_CACHE", str(readonly_folder))
    assert covidxray.load(tiny_run).predict(film).probability == pytest.approx(expected,
                                                                               abs=1e-6)
    assert "cannot be written" in caplog.text  # the cache moved to the temporary folder
    monkeypatch.undo()
    cached = sorted(runtime.cache_file("x").parent.glob("classifier-*.onnx"))
    for path in cached:
        path.write_bytes(path.read_bytes()[:1000])  # damaged since it was made
    assert covidxray.load(tiny_run).predict(film).probability == pytest.approx(expected,
                                                                               abs=1e-6)
    assert "exported again" in caplog.text


def test_an_export_that_fails_its_check_is_not_made_again_at_each_load(tiny_run, tmp_path,
                                                                        monkeypatch, caplog):
    from covidxray.model import runtime
    from covidxray.run import engines
    monkeypatch.setenv("COVIDXRAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engines, "PARITY_TOLERANCE", -1.0)  # no export can pass
    assert isinstance(covidxray.load(tiny_run).engine, KerasEngine)
    assert "differs from it" in caplog.text
    [refused] = (tmp_path / "cache").rglob("*.refused")
    assert not list((tmp_path / "cache").rglob("classifier-*.onnx"))

    def exported(*args):
        raise AssertionError("exported again")
    monkeypatch.setattr(runtime, "export_keras", exported)
    assert isinstance(covidxray.load(tiny_run).engine, KerasEngine)
    assert f"delete {refused}" in caplog.text
    # refused by other versions of Keras or onnxruntime: tried again with these
    refusal = json.loads(refused.read_text())
    refused.write_text(json.dumps(dict(refusal, versions={"keras": "0.1"})))
    with pytest.raises(AssertionError, match="exported again"):
        covidxray.load(tiny_run)


def test_a_keras_export_has_its_batch_normalisation_folded(tiny_run, tmp_path, monkeypatch):
    """Keras' export as it is written has a Sub, Mul and Add after its convolutions; the fold
    takes them into the convolutions, with the same answers (what the export runs)."""
    import onnxruntime

    from covidxray.model import onnxgraph
    engine = KerasEngine.load(tiny_run / "model.keras")
    monkeypatch.setattr(onnxgraph, "fold_batch_norms", lambda path: 0)
    engine.export_onnx(tmp_path / "as-exported.onnx")
    monkeypatch.undo()
    folded = tmp_path / "folded.onnx"
    folded.write_bytes((tmp_path / "as-exported.onnx").read_bytes())
    assert onnxgraph.fold_batch_norms(folded) > 0
    assert onnxgraph.fold_batch_norms(folded) == 0  # nothing left
    images = np.random.default_rng(0).random((2, *engine.model.input_shape[1:]), np.float32)
    sessions = [onnxruntime.InferenceSession(str(p))
                for p in (tmp_path / "as-exported.onnx", folded)]
    before, after = (s.run(None, {s.get_inputs()[0].name: images * 255}) for s in sessions)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, atol=1e-5)
