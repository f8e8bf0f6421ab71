import csv
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from covidxray.cli import main
from covidxray.evaluation.crossval import fold_score


def test_fold_score_uses_what_the_held_out_set_supports():
    def metrics(n, n_positive):
        values = {name: {"value": 0.5, "ci95": [0.4, 0.6]}
                  for name in ("roc_auc", "sensitivity", "specificity")}
        return {"overall": {"n": n, "n_positive": n_positive, "metrics": values}}
    assert fold_score(metrics(10, 4))["metric"] == "roc_auc"
    assert fold_score(metrics(10, 10))["metric"] == "sensitivity"
    assert fold_score(metrics(10, 0))["metric"] == "specificity"


def three_source_manifest(tiny_data, path):
    """Three sources: one with both classes, one COVID only, one NON-COVID only."""
    rows = list(csv.DictReader(open(tiny_data / "manifest.csv")))
    for row in rows:  # by patient, so that no patient spans two sources
        row["file"] = str(tiny_data / row["file"])
        mixed = int(row["patient_id"].rsplit("-", 1)[1]) % 2
        row["source"] = "mixed" if mixed else ("web" if row["label"] == "COVID" else "clinic")
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.slow
def test_leave_one_source_out(tiny_data, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="covidxray")
    manifest = three_source_manifest(tiny_data, tmp_path / "m.csv")
    out = tmp_path / "cv"
    code = main(["crossval", str(manifest), "--by", "source", "--out", str(out),
                 "--image-size", "64", "--backbone", "mobilenetv3small", "--weights", "none",
                 "--finetune-epochs", "1", "--no-exclude-confounded",
                 "--batch-size", "8", "--bootstrap", "50", "--no-augment"])
    assert code == 0
    result = json.loads((out / "crossval.json").read_text())
    by_fold = {f["fold"]: f for f in result["folds"]}
    assert by_fold["holdout-mixed"]["metric"] == "roc_auc"
    assert by_fold["holdout-web"]["metric"] == "sensitivity"
    assert by_fold["holdout-clinic"]["metric"] == "specificity"
    assert by_fold["holdout-web"]["test_images"] == by_fold["holdout-web"]["test_positive"] > 0
    for fold in result["folds"]:  # the held-out source never reaches training
        split = list(csv.DictReader(open(tmp_path / "cv" / fold["fold"] / "run" / "split.csv")))
        held = fold["fold"].removeprefix("holdout-")
        assert {r["split"] for r in split if r["source"] == held} == {"test"}
        assert {r["source"] for r in split if r["split"] == "test"} == {held}
    assert result["random_split"]["metric"] == "roc_auc"
    assert "holdout-web" in capsys.readouterr().out
    steps = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fold ")]
    assert steps[0].startswith("fold 1 of 4 (hold out clinic): 0.0 min elapsed")
    assert steps[-1].startswith("fold 4 of 4 (random split of all sources)")
    assert all("min left" in step for step in steps[1:])


def planted_marker_data(root, n_per_source=60, size=64):
    """Two sources of disease-free drawn films. In 'marked', every COVID image carries a bright
    corner marker and no other difference; in 'clean', labels are independent of the pixels.
    Whatever separates the classes here is the marker: a shortcut, not disease."""
    from PIL import Image

    from covidxray.data.synthetic import synthetic_radiograph
    rng = np.random.default_rng(0)
    lines = ["file,label,patient_id,source"]
    for source in ("marked", "clean"):
        for i in range(n_per_source):
            label = "COVID" if i % 2 else "NON-COVID"
            image = synthetic_radiograph(rng, size)
            if source == "marked" and label == "COVID":
                image[2:10, 2:10] = 1.0
            name = f"{source}-{i}.png"
            Image.fromarray((image * 255).astype(np.uint8)).save(root / name)
            lines.append(f"{name},{label},{source}-p{i},{source}")
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return root / "data.csv"


def test_protocol_exposes_a_marker_shortcut_with_the_thumbnail_baseline(tmp_path):
    from covidxray.config import TrainConfig
    from covidxray.evaluation.crossval import crossval, format_crossval
    data = planted_marker_data(tmp_path)
    config = TrainConfig(data=str(data), out=str(tmp_path / "cv"), weights="none",
                         split_fractions=(0.5, 0.25, 0.25))
    result = crossval(data, tmp_path / "cv", config, n_bootstrap=50, train_models=False)
    by_fold = {f["fold"]: f["thumbnail_baseline"] for f in result["folds"]}
    in_house = result["random_split"]["thumbnail_baseline"]["per_source"]["marked"]
    assert in_house["metric"] == "roc_auc" and in_house["value"] >= 0.95  # the marker
    assert by_fold["holdout-clean"]["value"] <= 0.75  # nothing to find without it
    assert "run" not in result["folds"][0]  # baseline only: no model was trained
    assert "thumbnail LR" in format_crossval(result)
    assert list(csv.DictReader(open(tmp_path / "cv" / "crossval.csv")))[0]["thumbnail_value"]


@pytest.mark.slow
def test_interrupted_crossval_resumes_with_the_same_recipe(tiny_data, tmp_path, monkeypatch):
    import covidxray.evaluation.crossval as cv
    from covidxray.config import TrainConfig
    from covidxray.training.fit import RunExistsError
    manifest = three_source_manifest(tiny_data, tmp_path / "m.csv")
    config = TrainConfig(data=str(manifest), out="", image_size=32, weights="none",
                         backbone="mobilenetv3small", finetune_epochs=1, batch_size=8,
                         exclude_confounded=False)
    real_train, trained = cv.train, []

    def train_then_stop(run_config, **kwargs):
        if len(trained) == 1:  # the second fold is cut off in the middle of training
            real_train(run_config, **kwargs)
            (Path(run_config.out) / "model.keras").unlink()
            raise KeyboardInterrupt
        trained.append(run_config.out)
        return real_train(run_config, **kwargs)
    monkeypatch.setattr(cv, "train", train_then_stop)
    out = tmp_path / "cv"
    with pytest.raises(KeyboardInterrupt):
        cv.crossval(manifest, out, config, random_split=False, n_bootstrap=20)
    first = json.loads((out / "holdout-clinic" / "fold.json").read_text())
    assert not (out / "holdout-mixed" / "fold.json").exists()

    with pytest.raises(RunExistsError, match="--resume"):
        cv.crossval(manifest, out, config, random_split=False, n_bootstrap=20)
    with pytest.raises(ValueError, match="image_size"):
        cv.crossval(manifest, out, replace(config, image_size=40), random_split=False,
                    n_bootstrap=20, resume=True)

    resumed = []
    monkeypatch.setattr(cv, "train", lambda c, **kw: resumed.append(kw) or real_train(c, **kw))
    result = cv.crossval(manifest, out, config, random_split=False, n_bootstrap=20,
                         resume=True)
    by_fold = {f["fold"]: f for f in result["folds"]}
    assert by_fold["holdout-clinic"] == first  # reused, not trained again
    # the interrupted fold continued its run; the fold never started was trained afresh
    assert [kw["resume"] for kw in resumed] == [True, False]
    assert (out / "holdout-mixed" / "run" / "model.keras").is_file()
    assert {f["fold"] for f in result["folds"]} == {"holdout-clinic", "holdout-mixed",
                                                    "holdout-web"}


@pytest.mark.slow
def test_training_sources_chosen_folds_share_their_run(tiny_data, tmp_path):
    """Trained on 'mixed' alone: 'mixed' cannot be held out (said so), and the two sources
    never trained on are both tested on the one model trained on 'mixed'."""
    from covidxray.config import TrainConfig
    from covidxray.evaluation.crossval import crossval, format_crossval
    manifest = three_source_manifest(tiny_data, tmp_path / "m.csv")
    config = TrainConfig(data=str(manifest), out="", image_size=32, weights="none",
                         backbone="mobilenetv3small", finetune_epochs=1, batch_size=8,
                         sources=("mixed",),
                         test_time_views=0)
    result = crossval(manifest, tmp_path / "cv", config, random_split=False, n_bootstrap=20)
    by_fold = {f["fold"]: f for f in result["folds"]}
    assert "cannot also be held out" in by_fold["holdout-mixed"]["skipped"]
    assert by_fold["holdout-web"]["run"] == by_fold["holdout-clinic"]["run"]
    assert by_fold["holdout-web"]["trained_on"] == ["mixed"]
    assert by_fold["holdout-web"]["metric"] == "sensitivity"
    assert by_fold["holdout-clinic"]["metric"] == "specificity"
    assert set(result["sources_left_out"]) == {"web", "clinic"}
    text = format_crossval(result)
    assert "web was never trained on" in text and "not scored" in text
    split = list(csv.DictReader(open(Path(by_fold["holdout-web"]["run"]) / "split.csv")))
    assert {r["source"] for r in split if r["split"] != "test"} == {"mixed"}


def test_the_thumbnail_baseline_scores_covid_against_each_other_class(tmp_path):
    """COVID against pneumonia and against no finding, in each view, for the baseline too:
    the table shows what image statistics alone do on the very contrast a model is judged on."""
    from covidxray.config import TrainConfig
    from covidxray.evaluation.crossval import crossval, format_crossval
    from tests.test_classes import three_classes
    rows = []
    for seed, source in enumerate(("north", "south")):
        folder = three_classes(tmp_path / source, n=24, seed=seed)
        for row in csv.DictReader(open(folder / "manifest.csv")):
            rows.append({**row, "file": f"{source}/{row['file']}", "source": source,
                         "patient_id": f"{source}-{row['patient_id']}"})
    with open(tmp_path / "data.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = TrainConfig(data=str(tmp_path / "data.csv"), out=str(tmp_path / "cv"),
                         weights="none", classes=("covid", "pneumonia", "normal"),
                         intensity="none", crop=0.0)
    result = crossval(tmp_path / "data.csv", tmp_path / "cv", config, n_bootstrap=50,
                      train_models=False)
    held = {f["fold"]: f for f in result["folds"]}["holdout-south"]["thumbnail_baseline"]
    found = held["contrasts"]
    assert set(found) == {"all", "PA", "AP"}
    assert set(found["all"]) == {"COVID vs PNEUMONIA", "COVID vs NORMAL"}
    assert found["all"]["COVID vs NORMAL"]["n"] == 48  # the held-out source's two classes
    assert found["all"]["COVID vs NORMAL"]["value"] > 0.9  # its bar is in every thumbnail
    assert "holdout-south, PA: COVID vs PNEUMONIA (12 vs 12 images) ROC-AUC thumbnail LR" \
        in format_crossval(result)
