from collections import Counter

import pytest

from covidxray.data.dataset import DataError, Record
from covidxray.data.split import (
    assign_splits,
    patients_across_splits,
    read_split_csv,
    write_split_csv,
)


def records(n_patients=60, images_per_patient=3, sources=("a", "b")):
    out = []
    for p in range(n_patients):
        label = "COVID" if p % 3 == 0 else ("NORMAL" if p % 3 == 1 else "PNEUMONIA")
        for i in range(images_per_patient if p % 2 else 1):
            out.append(Record(path=f"/d/{p}_{i}.png", label=label, target=int(label == "COVID"),
                              patient_id=f"p{p}", source=sources[p % len(sources)]))
    return out


def test_no_patient_crosses_splits_and_strata_kept():
    split = assign_splits(records(), (0.7, 0.15, 0.15), seed=3)
    assert patients_across_splits(split) == {}
    for name in ("train", "val", "test"):
        labels = Counter(r.label for r in split if r.split == name)
        assert set(labels) == {"COVID", "NORMAL", "PNEUMONIA"}, name
    sizes = Counter(r.split for r in split)
    assert sizes["train"] / len(split) == pytest.approx(0.7, abs=0.08)


def test_deterministic_under_seed():
    first = assign_splits(records(), seed=5)
    assert first == assign_splits(records(), seed=5)
    assert first != assign_splits(records(), seed=6)


def test_images_without_patient_are_their_own_group():
    rs = [Record(path=f"/d/{i}.png", label="COVID" if i % 2 else "N", target=i % 2)
          for i in range(100)]
    split = assign_splits(rs, seed=0)
    counts = Counter(r.split for r in split)
    assert counts["train"] == 70 and abs(counts["val"] - counts["test"]) <= 2


def test_given_splits_kept_and_val_carved_from_train():
    rs = [Record(path=f"/d/{i}.png", label="COVID" if i % 2 else "N", target=i % 2,
                 split="test" if i < 20 else "train") for i in range(100)]
    split = assign_splits(rs, (0.7, 0.15, 0.15), seed=0)
    assert all(r.split == "test" for r in split if int(r.path[3:-4]) < 20)
    counts = Counter(r.split for r in split)
    assert counts["test"] == 20 and 8 <= counts["val"] <= 20


def test_mixed_split_information_is_refused():
    rs = [Record(path="/a.png", label="A", target=1, split="train"),
          Record(path="/b.png", label="B", target=0)]
    with pytest.raises(DataError, match="no split"):
        assign_splits(rs)


def test_patient_leak_detected():
    rs = [Record(path="/a.png", label="A", target=1, patient_id="p", split="train"),
          Record(path="/b.png", label="A", target=1, patient_id="p", split="test")]
    assert patients_across_splits(rs) == {"p": ["test", "train"]}


def test_split_csv_round_trip(tmp_path):
    split = assign_splits(records(), seed=1)
    write_split_csv(tmp_path / "split.csv", split)
    assert read_split_csv(tmp_path / "split.csv") == {r.path: r.split for r in split}
    (tmp_path / "bad.csv").write_text("path,split\n/a.png,holdout\n")
    with pytest.raises(DataError, match="unknown split"):
        read_split_csv(tmp_path / "bad.csv")
