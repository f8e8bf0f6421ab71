"""The run folder's contract: typed, versioned, validated on load; older runs still load."""

import json

import pytest

from covidxray.config import Preprocessing
from covidxray.run.metadata import SCHEMA_VERSION, RunError, RunMetadata

VERSION_1 = {  # metadata.json as covidxray wrote it before the typed contract
    "notice": "Research use only.", "covidxray_version": "0.1.0",
    "created": "2026-11-26T10:00:00+00:00", "synthetic_data": False,
    "class_names": ["COVID", "NORMAL", "PNEUMONIA"], "positive_class": "COVID",
    "negative_classes": ["NORMAL", "PNEUMONIA"], "output": "P(positive class), one sigmoid unit",
    "image_size": 64, "backbone": "mobilenetv3small", "weights": "none",
    "preprocessing": {"reader": "covidxray.imageio.load_for_model", "intensity": "equalize",
                      "crop": 0.08, "steps": ["..."]},
    "threshold": 0.42, "threshold_method": "youden", "target_sensitivity": None,
    "validation_metrics": {"roc_auc": 0.9}, "split_counts": {"train": {"COVID": 3}},
    "unreadable_training_files": 0, "data_fingerprint": "ab" * 32, "data_root": "/data",
    "backend": "torch", "versions": {"keras": "3.15.1"}, "temperature": None,
    "test_time_views": 16, "dtype_policy": "float32"}


def test_a_version_1_run_loads_with_its_preprocessing(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps(VERSION_1))
    meta = RunMetadata.load(tmp_path / "metadata.json")
    assert meta.preprocessing == Preprocessing(64, "equalize", 0.08)
    assert meta.test_time_views == 16 and meta.threshold == 0.42
    assert meta.negative_label == "NON-COVID" and meta.label_of(0.5) == "COVID"
    assert meta.model_id == "mobilenetv3small-64px-" + "ab" * 6  # the id it was served under
    meta.save(tmp_path / "again.json")  # written back in the current format
    assert json.loads((tmp_path / "again.json").read_text())["schema_version"] == SCHEMA_VERSION
    assert RunMetadata.load(tmp_path / "again.json") == meta


def test_a_newer_or_broken_run_is_refused_clearly(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps({**VERSION_1, "schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(RunError, match="newer covidxray"):
        RunMetadata.load(path)
    path.write_text(json.dumps({k: v for k, v in VERSION_1.items() if k != "threshold"}))
    with pytest.raises(RunError, match="missing threshold"):
        RunMetadata.load(path)
    path.write_text(json.dumps({**VERSION_1, "threshold": 7}))
    with pytest.raises(RunError, match="not a probability"):
        RunMetadata.load(path)
    path.write_text("{not json")
    with pytest.raises(RunError, match="cannot read"):
        RunMetadata.load(path)


def test_public_form_has_no_local_paths(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps({**VERSION_1,
                                                        "weights": "/secret/w.weights.h5"}))
    public = RunMetadata.load(tmp_path / "metadata.json").public_dict()
    assert "data_root" not in public and public["weights"] == "w.weights.h5"
    assert "/secret" not in json.dumps(public) and "/data" not in json.dumps(public)
