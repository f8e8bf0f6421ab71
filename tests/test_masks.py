import pytest

from covidxray.data.masks import read_pairs, split_pairs


def test_pairs_are_split_by_patient(tmp_path):
    from covidxray.data.synthetic import make_synthetic_lung_masks
    folder = make_synthetic_lung_masks(tmp_path / "masks", n=12, size=32)
    pairs = read_pairs(folder)
    assert len(pairs) == 12 and all(p.group.startswith("patient:") for p in pairs)
    split = split_pairs(pairs + [pairs[0]], seed=3)  # the same patient twice: one split
    assert set(split.values()) == {"train", "val", "test"} and len(split) == 12
    with pytest.raises(ValueError, match="no image/mask pairs"):
        read_pairs(tmp_path)
