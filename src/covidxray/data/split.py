"""Grouped, stratified, seeded train/val/test splits, and the split.csv that records them."""

from __future__ import annotations

import csv
import io
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidxray.data.dataset import DataError, Record
from covidxray.fileutil import write_text_atomic

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "split", "label", "patient_id", "source", "view")


def assign_splits(records: list[Record], fractions=(0.70, 0.15, 0.15),
                  seed: int = 0) -> list[Record]:
    """Give every record a split; no patient (group) crosses splits.

    Groups are stratified by (class, source), so each split keeps every class and source in
    proportion. Records that already carry splits (split folders, a split column) keep them;
    when a validation split is missing it is carved out of train by the same rule.
    """
    given = {r.split for r in records}
    if given == {""}:
        shares = {name: share for name, share in zip(SPLITS, fractions) if share > 0}
        return _grouped_stratified(records, shares, seed)
    if "" in given:
        missing = sum(1 for r in records if not r.split)
        raise DataError(f"{missing} of {len(records)} images have no split while others do: "
                        f"give every image a split, or none")
    if "train" not in given:
        raise DataError(f"the data has splits {sorted(given)} but no training split")
    if "val" in given:
        return list(records)
    train = [r for r in records if r.split == "train"]
    rest = [r for r in records if r.split != "train"]
    val_share = fractions[1] / (fractions[0] + fractions[1])
    carved = _grouped_stratified(train, {"train": 1 - val_share, "val": val_share}, seed)
    return sorted(carved + rest, key=lambda r: r.path)


def _grouped_stratified(records: list[Record], fractions: dict[str, float],
                        seed: int) -> list[Record]:
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    strata: dict[tuple, list[str]] = defaultdict(list)
    for name, members in sorted(groups.items()):
        label = Counter(m.label for m in members).most_common(1)[0][0]
        strata[(label, members[0].source)].append(name)
    rng = np.random.default_rng(seed)
    split_of_group = {}
    assigned = dict.fromkeys(fractions, 0)  # over all strata, to break ties in small strata
    for key in sorted(strata):
        names = strata[key]
        order = rng.permutation(len(names))
        total = sum(len(groups[n]) for n in names)
        counts = dict.fromkeys(fractions, 0)
        for index in order:
            name = names[index]
            size = len(groups[name])
            overall = sum(assigned.values()) + size
            # the split furthest below its share of this stratum; ties go to the split
            # furthest below its share overall
            split = max(fractions, key=lambda s: (round(fractions[s] * total - counts[s], 9),
                                                  fractions[s] * overall - assigned[s]))
            split_of_group[name] = split
            counts[split] += size
            assigned[split] += size
    return [replace(r, split=split_of_group[r.group]) for r in records]


def patients_across_splits(records: list[Record]) -> dict[str, list[str]]:
    """Patient ids that occur in more than one split (an empty dict means no leak)."""
    splits: dict[str, set] = defaultdict(set)
    for record in records:
        if record.patient_id:
            splits[record.patient_id].add(record.split)
    return {p: sorted(s) for p, s in splits.items() if len(s) > 1}


def write_split_csv(path: str | Path, records: list[Record]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLIT_COLUMNS)
    for r in records:
        writer.writerow([r.path, r.split, r.label, r.patient_id, r.source, r.view])
    write_text_atomic(path, buffer.getvalue())


def read_split_csv(path: str | Path) -> dict[str, str]:
    """path -> split, from a split.csv written by ``write_split_csv``."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "split"} <= set(reader.fieldnames):
            raise DataError(f"{path}: a split file needs the columns path,split")
        splits = {row["path"]: row["split"] for row in reader}
    bad = sorted({s for s in splits.values() if s not in SPLITS})
    if bad:
        raise DataError(f"{path}: unknown split names {bad} (use {', '.join(SPLITS)})")
    return splits


def read_split_records(path: str | Path, positive_class: str) -> list[Record]:
    """Every record of a split.csv written by ``write_split_csv``."""
    with open(path, newline="") as handle:
        return [Record(path=row["path"], label=row["label"],
                       target=int(row["label"] == positive_class),
                       patient_id=row.get("patient_id", ""), source=row.get("source", ""),
                       split=row["split"], view=row.get("view", ""))
                for row in csv.DictReader(handle)]
