"""Which sources training uses, and which would teach a model the source instead of the
disease."""

import pytest

from covidxray.data.dataset import DataError, Record
from covidxray.data.sources import confounded_sources, select_sources


def labelled(counts: dict[str, tuple[int, int]]) -> list[Record]:
    """Records (no files) with (positives, negatives) per source."""
    records = []
    for source, (positives, negatives) in counts.items():
        for i in range(positives + negatives):
            label = "COVID" if i < positives else "NORMAL"
            records.append(Record(path=f"{source}_{i}.png", label=label,
                                  target=int(label == "COVID"), source=source))
    return records


# cxr-dev's shape: one COVID-only source, two far from the others' COVID share, one balanced
CXR_DEV_LIKE = {"cxnet": (40, 0), "darkcov": (6, 60), "ieee": (10, 2), "raddb": (60, 60)}


def test_confounded_sources_are_named_with_the_reason():
    found = confounded_sources(labelled(CXR_DEV_LIKE))
    assert set(found) == {"cxnet", "darkcov", "ieee"}
    assert "one class only" in found["cxnet"]
    assert "positive against" in found["darkcov"]


def test_select_sources_keeps_what_is_asked_and_says_why():
    records = labelled(CXR_DEV_LIKE)
    kept, left_out = select_sources(records, exclude_confounded=True)
    assert {r.source for r in kept} == {"raddb"} and set(left_out) == {"cxnet", "darkcov", "ieee"}
    assert all(reason.startswith("confounded") for reason in left_out.values())
    kept, left_out = select_sources(records, include=["raddb", "darkcov"], exclude=["darkcov"])
    assert {r.source for r in kept} == {"raddb"}
    assert "--exclude-sources" in left_out["darkcov"] and "--sources" in left_out["ieee"]
    assert select_sources(records) == (records, {})
    with pytest.raises(DataError, match="unknown source"):
        select_sources(records, include=["nih"])
    with pytest.raises(DataError, match="both classes"):
        select_sources(records, include=["cxnet"])
