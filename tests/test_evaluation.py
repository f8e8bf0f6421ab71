import json

import numpy as np

import pytest

import covidxray
from covidxray.evaluation.text import format_report


def test_evaluate_on_other_data_with_sources(tiny_run, tiny_data, tmp_path):
    out = tmp_path / "m.json"
    result = covidxray.evaluate(tiny_run, tiny_data, bootstrap=50, out=out,
                                source_from_prefix=True)
    assert json.loads(out.read_text())["overall"]["n"] == 28
    assert set(result["per_source"]) == {"synthetic"}  # manifest column wins over the prefix
    assert set(result["per_class"]) == {"COVID", "NON-COVID"}
    text = format_report(result)
    assert "SYNTHETIC" in text and "per source" in text and "Not a medical device" in text


def test_default_is_the_run_test_split(own_run):
    result = covidxray.evaluate(own_run, bootstrap=0)
    assert "test split" in result["data"]
    assert (own_run / "metrics.json").is_file()


def test_unreadable_files_are_listed(tiny_run, tiny_data, tmp_path):
    import shutil
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "COVID" / "broken.png").write_text("no")
    result = covidxray.evaluate(tiny_run, data, bootstrap=0, out=tmp_path / "m.json")
    assert [u["path"].endswith("broken.png") for u in result["unreadable_files"]] == [True]
    with pytest.raises(Exception, match="broken.png"):
        covidxray.evaluate(tiny_run, data, bootstrap=0, out=tmp_path / "m2.json", strict=True)


def test_evaluating_other_data_keeps_the_runs_own_test_metrics(own_run, tiny_data):
    own = covidxray.evaluate(own_run, bootstrap=0, shortcut_images=0)
    other = covidxray.evaluate(own_run, tiny_data, bootstrap=0, shortcut_images=0)
    assert own["metrics_file"] == str(own_run / "metrics.json")
    assert other["metrics_file"] != own["metrics_file"]
    assert "evaluations" in other["metrics_file"]
    assert json.loads((own_run / "metrics.json").read_text())["data"] == own["data"]


def test_contrasts_score_covid_against_each_other_class_and_within_views():
    from covidxray.data.dataset import Record
    from covidxray.evaluation.evaluate import contrasts
    rng = np.random.default_rng(0)
    records, scores = [], []
    for label, mean in (("COVID", 0.8), ("PNEUMONIA", 0.6), ("NORMAL", 0.2)):
        for i in range(40):
            records.append(Record(f"{label}{i}.png", label, int(label == "COVID"),
                                  view="AP Supine" if i % 2 else "PA"))
            scores.append(np.clip(rng.normal(mean, 0.1), 0, 1))
    found = contrasts(records, np.array(scores), "COVID", 200, 0)
    assert set(found) == {"all", "PA", "AP"}
    easy, hard = found["all"]["COVID vs NORMAL"], found["all"]["COVID vs PNEUMONIA"]
    assert easy["value"] > 0.99 and 0.8 < hard["value"] < 0.99
    assert hard["ci95"][0] < hard["value"] < hard["ci95"][1] and hard["n"] == 80
    assert found["AP"]["COVID vs PNEUMONIA"]["n"] == 40  # AP supine counts as AP


def test_the_evaluation_is_typed_versioned_and_older_files_load(own_run, tmp_path):
    """metrics.json carries its schema version; a file from before (no version) loads as the
    typed result, a newer one is refused, and the report takes the saved file as it is."""
    import json

    from covidxray.evaluation.result import SCHEMA_VERSION, EvaluationFileError, \
        EvaluationResult
    result = covidxray.evaluate(own_run, bootstrap=20, shortcut_images=0)
    assert isinstance(result, EvaluationResult) and result.overall["n"] > 0
    saved = json.loads((own_run / "metrics.json").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION
    older = {k: v for k, v in saved.items() if k not in ("schema_version", "lungs_hidden")}
    (tmp_path / "old.json").write_text(json.dumps(older))
    loaded = EvaluationResult.load(tmp_path / "old.json")
    assert json.dumps(loaded.overall) == json.dumps(saved["overall"])  # NaN-safe
    assert loaded.lungs_hidden is None
    (tmp_path / "new.json").write_text(json.dumps({**saved, "schema_version": 99}))
    with pytest.raises(EvaluationFileError, match="newer covidxray"):
        EvaluationResult.load(tmp_path / "new.json")
    with pytest.raises(EvaluationFileError, match="not a covidxray evaluation"):
        EvaluationResult.from_dict({"overall": {}})
    assert result["overall"] is result.overall  # the dictionary access of before still reads
