"""Discover a labelled data set and load its images.

Three layouts are read:

* class folders: ``DATA/<class>/<image>`` (any class names, any case);
* split folders of class folders: ``DATA/<Train|val|Test...>/<class>/<image>``;
* a CSV manifest ``file,label[,patient_id][,source][,split]`` (paths relative to the CSV).

A folder that holds a ``manifest.csv`` with a ``file`` column also takes its ``patient_id``
and ``source`` columns, so a class-folder tree can still be split by patient.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from covidxray.errors import UserError
from covidxray.config import Preprocessing
from covidxray.fileutil import file_sha256
from covidxray.progress import progress
from covidxray.pixels.decode import ImageReadError, is_image_candidate, read_image
from covidxray.pixels.preprocess import as_preprocessing, prepare

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = "SYNTHETIC.txt"
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}


class DataError(UserError, ValueError):
    """The data set as a whole cannot be used (not a single bad file: those are skipped)."""


@dataclass(frozen=True)
class Record:
    """One labelled image. ``label`` is the original class name; ``target`` is 1 for positive."""

    path: str
    label: str
    target: int
    patient_id: str = ""
    source: str = ""
    split: str = ""
    view: str = ""  # PA, AP, AP Supine ... where the manifest says

    @property
    def group(self) -> str:
        """The unit that must not cross splits: the patient when known, else the image."""
        return self.patient_id or self.path


@dataclass
class Dataset:
    root: str
    records: list[Record]
    class_names: list[str]
    positive_class: str
    synthetic: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    sources_left_out: dict[str, str] = field(default_factory=dict)  # source -> why
    roots: list[str] = field(default_factory=list)  # several data sets: each one's root

    def subset(self, split: str) -> list[Record]:
        return [r for r in self.records if r.split == split]


def default_positive_class(class_names: list[str]) -> str:
    """The class whose name contains 'covid' without a negation ('non', 'no', 'not')."""
    candidates = [name for name in class_names if "covid" in name.lower()
                  and not re.search(r"(non|no|not)[\W_]*covid", name.lower())]
    if len(candidates) != 1:
        raise DataError(f"cannot tell the positive class among {class_names}: "
                        f"name it with --positive-class")
    return candidates[0]


def _near_miss(label: str, positive: str) -> bool:
    """A label a typing slip away from the positive class's name, not a negation of it."""
    import difflib
    a, b = label.lower(), positive.lower()
    if re.search(r"(non|no|not)[\W_]*" + re.escape(b), a):
        return False
    return difflib.SequenceMatcher(None, a, b).ratio() >= 0.75


def source_from_filename(path: str | Path) -> str:
    """The file-name prefix before the first '_' (``ieee_123.png`` -> ``ieee``)."""
    return Path(path).name.split("_", 1)[0]


def discover(data, positive_class: str | None = None, source_from_prefix: bool = False,
             strict: bool = False, same_patients: dict[str, str] | None = None,
             same_sources: dict[str, str] | None = None) -> Dataset:
    """Find every labelled image under ``data``: a folder or a CSV manifest, or several of
    them (a list; ``discover_many``).

    Labels that differ only by case or surrounding spaces are one class. What a manifest gets
    wrong (a file listed twice, a file with two labels, rows without a label, labels spelt two
    ways) is named in one warning with its rows; a file with two labels is left out, a repeated
    row counted once. ``strict``: any of it is a ``DataError``. ``same_patients`` and
    ``same_sources`` rename patient-id namespaces and sources that are one.
    """
    if isinstance(data, (list, tuple)):
        if len(data) > 1:
            return discover_many(data, positive_class, source_from_prefix, strict,
                                 same_patients, same_sources)
        data = data[0]
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    problems: list[str] = []
    if data.is_file():
        rows, skipped = _rows_from_manifest(data, problems)
        root = data.parent
    else:
        rows, skipped = _rows_from_folders(data)
        root = data
        manifest = data / "manifest.csv"
        if manifest.is_file():
            rows = _join_manifest_columns(rows, manifest)
    rows = _normalised_labels(rows, problems)
    if problems:
        block = f"{data}: the labels need a look (" + "; ".join(problems) + ")"
        if strict:
            raise DataError(block + "; fix them, or leave out --strict")
        log.warning("%s", block)
    if not rows:
        raise DataError(f"{data}: no labelled images found (expected class folders, split "
                        f"folders of class folders, or a CSV with file,label columns)")
    class_names = sorted({row["label"] for row in rows})
    if len(class_names) < 2:
        raise DataError(f"{data}: found only the class {class_names}; need at least two")
    if positive_class is None:
        positive_class = default_positive_class(class_names)
    matches = [c for c in class_names if c.lower() == positive_class.lower()]
    if not matches:
        raise DataError(f"positive class {positive_class!r} is not among {class_names}")
    positive_class = matches[0]
    for name in class_names:
        if name != positive_class and _near_miss(name, positive_class):
            count = sum(row["label"] == name for row in rows)
            log.warning("the label %r (%d images) looks like a misspelling of the positive "
                        "class %r: it is counted as negative; correct it, or name the positive "
                        "class with --positive-class", name, count, positive_class)
    records = []
    for row in rows:
        source = row.get("source", "")
        if source_from_prefix and not source:
            source = source_from_filename(row["path"])
        source = (same_sources or {}).get(source, source)
        records.append(Record(path=row["path"], label=row["label"],
                              target=int(row["label"] == positive_class),
                              patient_id=_patient(row.get("patient_id", ""), same_patients),
                              source=source, split=row.get("split", ""),
                              view=row.get("view", "")))
    records.sort(key=lambda r: r.path)
    return Dataset(root=str(root), records=records, class_names=class_names,
                   positive_class=positive_class,
                   synthetic=(root / SYNTHETIC_MARKER).exists(), skipped=skipped)


def _patient(patient_id: str, same_patients: dict[str, str] | None) -> str:
    """A patient id with its namespace renamed where ``same_patients`` says two namespaces
    name the same patients (``{"ieeefull": "ieee"}``: ``ieeefull:12`` is ``ieee:12``)."""
    namespace, colon, rest = patient_id.partition(":")
    if colon and same_patients and namespace in same_patients:
        return f"{same_patients[namespace]}:{rest}"
    return patient_id


def discover_many(datas, positive_class: str | None = None, source_from_prefix: bool = False,
                  strict: bool = False, same_patients: dict[str, str] | None = None,
                  same_sources: dict[str, str] | None = None) -> Dataset:
    """Several data sets as one: every one's records, their classes together, the positive
    class the same in all. Sources stay apart (a record without a source takes its data set's
    name), and so do patients: an id without a namespace (``12``, not ``ieee:12``) is taken
    as its data set's own (``cxr-extra/12``), a namespaced id means the same patient in any
    data set, and ``same_patients`` names namespaces that are one (``ieeefull`` = ``ieee``)."""
    parts = [discover(d, positive_class, source_from_prefix, strict, same_patients,
                      same_sources) for d in datas]
    positives = {p.positive_class.lower() for p in parts}
    if len(positives) > 1:
        raise DataError(f"the data sets disagree on the positive class "
                        f"({', '.join(p.positive_class for p in parts)}); name it with "
                        f"--positive-class")
    names = [Path(p.root).name or f"data{i}" for i, p in enumerate(parts)]
    if len(set(names)) < len(names):
        names = [f"{name}{i}" for i, name in enumerate(names)]
    spelling = {}
    for part in parts:
        for name in part.class_names:
            spelling.setdefault(name.lower(), name)
    records = []
    for part, name in zip(parts, names):
        for r in part.records:
            records.append(replace(
                r, label=spelling[r.label.lower()], source=r.source or name,
                patient_id=r.patient_id if ":" in r.patient_id or not r.patient_id
                else f"{name}/{r.patient_id}"))
    records.sort(key=lambda r: r.path)
    seen = {}
    for r in records:
        seen.setdefault(str(Path(r.path).resolve()), []).append(r)
    twice = [rs for rs in seen.values() if len(rs) > 1]
    if twice:
        log.warning("%d files are in more than one of the data sets (e.g. %s): each is kept "
                    "once", len(twice), twice[0][0].path)
        records = [rs[0] for rs in seen.values()]
    return Dataset(root=parts[0].root, records=records,
                   class_names=sorted(spelling.values()),
                   positive_class=spelling[next(iter(positives))],
                   synthetic=any(p.synthetic for p in parts),
                   skipped=[s for p in parts for s in p.skipped],
                   roots=[p.root for p in parts])


def _rows_from_folders(root: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    subfolders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_folders = [p for p in subfolders if p.name.lower() in SPLIT_NAMES]
    rows, skipped = [], []
    if split_folders:
        if len(split_folders) != len(subfolders):
            others = [p.name for p in subfolders if p not in split_folders]
            raise DataError(f"{root}: mixes split folders {[p.name for p in split_folders]} "
                            f"with other folders {others}")
        for split_dir in split_folders:
            split = SPLIT_NAMES[split_dir.name.lower()]
            for row in _class_folder_rows(split_dir, skipped):
                rows.append({**row, "split": split})
    else:
        rows = _class_folder_rows(root, skipped)
    return rows, skipped


def _class_folder_rows(root: Path, skipped: list) -> list[dict]:
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for path in sorted(class_dir.rglob("*")):
            if is_image_candidate(path):
                rows.append({"path": str(path), "label": class_dir.name})
            elif path.is_file() and not path.name.startswith("."):
                skipped.append((str(path), f"not an image file suffix ({path.suffix})"))
    return rows


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise DataError(f"{path}: empty CSV")
        return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                for row in reader]


LISTED = 3  # rows named per problem in the warning


def _lines(numbers: list) -> str:
    shown = ", ".join(map(str, numbers[:LISTED]))
    return shown + (f" and {len(numbers) - LISTED} more" if len(numbers) > LISTED else "")


def _rows_from_manifest(path: Path, problems: list[str]
                        ) -> tuple[list[dict], list[tuple[str, str]]]:
    """The manifest's rows, each file once: repeated rows are counted once, a file listed with
    two labels is left out; each is added to ``problems`` with its lines."""
    table = _read_csv(path)
    if not table or "file" not in table[0] or "label" not in table[0]:
        raise DataError(f"{path}: a manifest needs at least the columns file,label")
    rows, skipped, no_label = [], [], []
    seen: dict[str, list] = {}  # resolved file -> [(line, label)]
    for line, row in enumerate(table, start=2):
        if not row["file"] or not row["label"]:
            skipped.append((f"{path}:{line}", "row without file or label"))
            if row["file"]:
                no_label.append(line)
            continue
        file = Path(row["file"])
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            skipped.append((str(file), f"listed in {path.name} (line {line}) but not found"))
            continue
        seen.setdefault(str(file.resolve()), []).append((line, row["label"].lower()))
        if len(seen[str(file.resolve())]) > 1:
            continue
        entry = {"path": str(file), "label": row["label"], "line": line,
                 "patient_id": row.get("patient_id", ""), "source": row.get("source", ""),
                 "view": row.get("view", "")}
        if row.get("split"):
            split = SPLIT_NAMES.get(row["split"].lower())
            if split is None:
                raise DataError(f"{path}:{line}: unknown split {row['split']!r} "
                                f"(use train, val or test)")
            entry["split"] = split
        rows.append(entry)
    repeated = [n for lines in seen.values() if len({label for _, label in lines}) == 1
                for n, _ in lines[1:]]
    conflicting = {file: lines for file, lines in seen.items()
                   if len({label for _, label in lines}) > 1}
    if no_label:
        problems.append(f"{len(no_label)} rows without a label, left out: lines "
                        f"{_lines(no_label)}")
    if repeated:
        problems.append(f"{len(repeated)} rows repeat a file listed before with the same "
                        f"label, counted once: lines {_lines(repeated)}")
    if conflicting:
        examples = [f"{Path(file).name} (lines " + "/".join(str(n) for n, _ in lines) + ": "
                    + " vs ".join(sorted({label for _, label in lines})) + ")"
                    for file, lines in list(conflicting.items())[:LISTED]]
        problems.append(f"{len(conflicting)} files listed with two labels, left out: "
                        + ", ".join(examples))
        rows = [r for r in rows if str(Path(r["path"]).resolve()) not in conflicting]
    return rows, skipped


def _normalised_labels(rows: list[dict], problems: list[str]) -> list[dict]:
    """Labels that differ only by case or surrounding spaces become one: the spelling most
    rows use (added to ``problems`` with the spellings found)."""
    spellings: dict[str, dict[str, int]] = {}
    for row in rows:
        row["label"] = row["label"].strip()
        counts = spellings.setdefault(row["label"].lower(), {})
        counts[row["label"]] = counts.get(row["label"], 0) + 1
    chosen = {}
    for key, counts in spellings.items():
        chosen[key] = max(sorted(counts), key=counts.get)
        if len(counts) > 1:
            problems.append("one class spelt " + ", ".join(f"{name!r} ({n} rows)" for name, n in
                                                           sorted(counts.items()))
                            + f": all read as {chosen[key]!r}")
    for row in rows:
        row["label"] = chosen[row["label"].lower()]
        row.pop("line", None)
    return rows


def _join_manifest_columns(rows: list[dict], manifest: Path) -> list[dict]:
    table = _read_csv(manifest)
    if not table or "file" not in table[0]:
        return rows
    by_file = {str((manifest.parent / row["file"]).resolve()): row for row in table}
    joined = []
    for row in rows:
        extra = by_file.get(str(Path(row["path"]).resolve()), {})
        joined.append({**row, **{k: extra[k] for k in ("patient_id", "source", "view")
                                 if extra.get(k)}})
    return joined


@dataclass
class LoadedImages:
    """Images prepared for the model, with the records that loaded and those that failed."""

    images: np.ndarray  # (n, size, size) uint8
    records: list[Record]
    failures: list[ImageReadError]
    # with a segmenter: the paths of the images on which no plausible lungs were found (a lung
    # crop cropped them by the fixed fallback instead)
    no_lungs: list[str] = field(default_factory=list)
    lungs_checked: bool = False  # a segmenter looked for every image's lungs

    @property
    def targets(self) -> np.ndarray:
        return np.array([r.target for r in self.records], dtype=np.float32)


def load_images(records: list[Record], spec: int | Preprocessing,
                strict: bool = False, segmenter=None) -> LoadedImages:
    """Decode and prepare every record's image (``spec``: the run's ``Preprocessing``, or an
    image size for resizing only); unreadable files are collected, not fatal. A lung crop
    needs ``segmenter`` (a ``model.lungs.LungSegmenter``); given one, every image's lungs are
    looked for (``no_lungs``), cropped to or not.

    With ``strict`` the first unreadable file raises its ``ImageReadError``.
    """
    spec = as_preprocessing(spec)
    images, kept, failures, no_lungs = [], [], [], []
    for record in progress(records, desc="loading images"):
        try:
            gray = read_image(record.path)
        except ImageReadError as error:
            if strict:
                raise
            failures.append(error)
            continue
        lungs = segmenter.field(gray) if segmenter is not None else None
        if lungs is not None and not lungs.plausible:
            no_lungs.append(record.path)
        images.append(prepare(gray, spec, lungs))
        kept.append(record)
    if no_lungs and spec.lung_crop:
        log.warning("%d of %d images have no plausible lungs (e.g. %s): cropped by the fixed "
                    "fallback instead of the lungs", len(no_lungs), len(kept), no_lungs[0])
    array = np.stack(images) if images else np.zeros((0, spec.image_size, spec.image_size),
                                                     np.uint8)
    return LoadedImages(images=array, records=kept, failures=failures, no_lungs=no_lungs,
                        lungs_checked=segmenter is not None)


def file_hashes(records: list[Record]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """path -> sha256 of the file's bytes, read once for every check that needs them; and the
    (path, reason) of each file that cannot be read."""
    hashes, unreadable = {}, []
    for r in progress(records, desc="hashing files", unit="file"):
        try:
            hashes[r.path] = file_sha256(r.path)
        except OSError as exc:
            unreadable.append((r.path, f"cannot read file ({exc.strerror or exc})"))
    return hashes, unreadable


def fingerprint(records: list[Record], hashes: dict[str, str] | None = None) -> str:
    """A hash of the training data: every file's content, label and split."""
    hashes = hashes if hashes is not None else file_hashes(records)[0]
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.path):
        digest.update(f"{hashes[record.path]}\t{record.label}\t{record.split}\n".encode())
    return digest.hexdigest()


def with_splits(records: list[Record], splits: dict[str, str]) -> list[Record]:
    """Records with their ``split`` set from ``splits`` (path -> split); unlisted ones dropped."""
    return [replace(r, split=splits[r.path]) for r in records if r.path in splits]
