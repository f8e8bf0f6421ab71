import numpy as np
import pytest
from PIL import Image

from covidxray.data.dataset import (
    DataError,
    default_positive_class,
    discover,
    fingerprint,
    load_images,
)


def png(path, value=128, size=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)
    return path


def test_class_folders_any_case_and_names(tmp_path):
    for i in range(3):
        png(tmp_path / "Covid" / f"c{i}.png")
        png(tmp_path / "Normal" / f"n{i}.png")
        png(tmp_path / "PNEUMONIA" / "sub" / f"p{i}.jpg")
    (tmp_path / "Normal" / "README.md").write_text("notes")
    ds = discover(tmp_path)
    assert ds.class_names == ["Covid", "Normal", "PNEUMONIA"]
    assert ds.positive_class == "Covid"
    assert sum(r.target for r in ds.records) == 3 and len(ds.records) == 9
    assert {r.label for r in ds.records if not r.target} == {"Normal", "PNEUMONIA"}
    assert [s[0].endswith("README.md") for s in ds.skipped] == [True]
    assert not ds.synthetic


@pytest.mark.parametrize("names,expected", [
    (["COVID", "NON-COVID"], "COVID"), (["covid19", "non_covid"], "covid19"),
    (["NonCovid", "Covid-19"], "Covid-19"), (["no covid", "COVID"], "COVID")])
def test_default_positive_class(names, expected):
    assert default_positive_class(names) == expected


def test_positive_class_must_be_clear(tmp_path):
    with pytest.raises(DataError, match="--positive-class"):
        default_positive_class(["cats", "dogs"])
    png(tmp_path / "A" / "a.png"), png(tmp_path / "B" / "b.png")
    assert discover(tmp_path, positive_class="b").positive_class == "B"
    with pytest.raises(DataError, match="not among"):
        discover(tmp_path, positive_class="C")


def test_kaggle_split_folders(tmp_path):
    for split in ("Train", "Test"):
        for label in ("COVID", "NON-COVID"):
            png(tmp_path / split / label / f"{split}-{label}.png")
    ds = discover(tmp_path)
    assert sorted({r.split for r in ds.records}) == ["test", "train"]
    assert ds.class_names == ["COVID", "NON-COVID"]


def test_manifest_csv(tmp_path):
    png(tmp_path / "img" / "a.png"), png(tmp_path / "img" / "b.png"), png(tmp_path / "img" / "c.png")
    (tmp_path / "list.csv").write_text(
        "file,label,patient_id,source,split\nimg/a.png,COVID,p1,s1,Train\n"
        "img/b.png,normal,p2,s2,val\nimg/c.png,normal,p2,s2,test\n,normal,,,\n")
    ds = discover(tmp_path / "list.csv")
    assert [(r.patient_id, r.source, r.split) for r in ds.records] == [
        ("p1", "s1", "train"), ("p2", "s2", "val"), ("p2", "s2", "test")]
    assert len(ds.skipped) == 1


def test_manifest_beside_class_folders_adds_patients(tmp_path):
    png(tmp_path / "COVID" / "a.png"), png(tmp_path / "NORMAL" / "b.png")
    (tmp_path / "manifest.csv").write_text("file,label,patient_id\nCOVID/a.png,COVID,p7\n")
    ds = discover(tmp_path)
    assert [r.patient_id for r in ds.records] == ["p7", ""]


def test_source_from_prefix(tmp_path):
    png(tmp_path / "COVID" / "ieee_x.png"), png(tmp_path / "NORMAL" / "nih_y.png")
    assert [r.source for r in discover(tmp_path, source_from_prefix=True).records] == \
        ["ieee", "nih"]


def test_unusable_data_sets(tmp_path):
    with pytest.raises(DataError, match="no such"):
        discover(tmp_path / "missing")
    with pytest.raises(DataError, match="no labelled images"):
        discover(tmp_path)
    png(tmp_path / "COVID" / "a.png")
    with pytest.raises(DataError, match="at least two"):
        discover(tmp_path)


def test_load_images_skips_bad_files_or_stops_when_strict(tmp_path):
    png(tmp_path / "COVID" / "a.png", 10), png(tmp_path / "NORMAL" / "b.png", 200)
    (tmp_path / "NORMAL" / "bad.png").write_text("no image")
    ds = discover(tmp_path)
    loaded = load_images(ds.records, 16)
    assert loaded.images.shape == (2, 16, 16) and loaded.images.dtype == np.uint8
    assert [f.path.endswith("bad.png") for f in loaded.failures] == [True]
    assert loaded.targets.tolist() == [1.0, 0.0]
    with pytest.raises(Exception, match="bad.png"):
        load_images(ds.records, 16, strict=True)


def test_fingerprint_changes_with_content(tmp_path):
    png(tmp_path / "COVID" / "a.png", 10), png(tmp_path / "NORMAL" / "b.png", 200)
    before = fingerprint(discover(tmp_path).records)
    assert fingerprint(discover(tmp_path).records) == before
    png(tmp_path / "NORMAL" / "b.png", 201)
    assert fingerprint(discover(tmp_path).records) != before
