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


def test_a_manifest_says_what_it_gets_wrong(tmp_path, caplog):
    """Repeated rows, a file with two labels, an empty label and a label spelt another way:
    one warning naming the rows; each file once, mis-cased labels read as their class;
    --strict makes it an error."""
    from pathlib import Path
    for i in range(6):
        Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    rows = ["file,label", "0.png,COVID", "0.png,COVID", f"{tmp_path / '0.png'},COVID",
            "1.png,COVID", "1.png,NORMAL", "2.png,", "3.png,covid ", "4.png,NORMAL",
            "5.png,NORMAL"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        dataset = discover(tmp_path / "m.csv")
    assert sorted(Path(r.path).name for r in dataset.records) == ["0.png", "3.png", "4.png",
                                                                  "5.png"]
    assert dataset.class_names == ["COVID", "NORMAL"]
    assert {Path(r.path).name: r.target for r in dataset.records}["3.png"] == 1
    (warning,) = [r.message for r in caplog.records if "labels need a look" in r.message]
    assert "1 rows without a label, left out: lines 7" in warning
    assert "2 rows repeat a file listed before with the same label, counted once: lines 3, 4" \
        in warning
    assert "1 files listed with two labels, left out: 1.png (lines 5/6: covid vs normal)" \
        in warning
    assert "one class spelt 'COVID' (1 rows), 'covid' (1 rows): all read as 'COVID'" in warning
    assert not any("misspelling" in r.message for r in caplog.records)
    with pytest.raises(DataError, match="labels need a look"):
        discover(tmp_path / "m.csv", strict=True)


def test_several_data_sets_keep_their_sources_and_patients_apart(tmp_path):
    from covidxray.data.dataset import discover
    for name, classes in (("dev", ("COVID", "NORMAL")), ("extra", ("covid", "PNEUMONIA"))):
        rows = ["file,label,patient_id,view"]
        for label in classes:
            (tmp_path / name / label).mkdir(parents=True)
            for i in range(2):
                file = f"{label}/{label.lower()}{i}.png"
                Image.fromarray(np.full((16, 16), 10 * i + len(label), np.uint8)).save(
                    tmp_path / name / file)
                patient = f"ieee:{i}" if name == "dev" else (f"ieeefull:{i}" if i == 0 else "7")
                rows.append(f"{file},{label},{patient},{'AP' if i else 'PA'}")
        (tmp_path / name / "manifest.csv").write_text("\n".join(rows) + "\n")
    merged = discover([tmp_path / "dev", tmp_path / "extra"],
                      same_patients={"ieeefull": "ieee"})
    assert merged.class_names == ["COVID", "NORMAL", "PNEUMONIA"]
    assert merged.positive_class == "COVID" and {r.source for r in merged.records} == {
        "dev", "extra"}
    extra = {r.patient_id for r in merged.records if r.source == "extra"}
    assert extra == {"ieee:0", "extra/7"}  # one patient with dev's ieee:0; 7 is extra's own
    assert {r.view for r in merged.records} == {"PA", "AP"}
    assert sum(r.target for r in merged.records) == 4
    assert merged.roots == [str(tmp_path / "dev"), str(tmp_path / "extra")]
