"""Audit a data set for what makes a chest X-ray classifier look better than it is.

Source x class confounding (``sources.confounded_sources``), image properties that separate the
classes (with the image-statistics study of ``statistics``), exact and near duplicates (within
and across splits and classes), label conflicts, and patients found in more than one split. The
cheap parts (exact duplicates and patients across splits) also run inside ``train``.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from covidxray.config import EVALUATION
from covidxray.data.dataset import Record
from covidxray.data.sources import confounded_sources
from covidxray.data.split import patients_across_splits
from covidxray.data.statistics import image_statistics_separability, separability_warnings
from covidxray.pixels.decode import ImageReadError, header_facts, read_image
from covidxray.progress import progress

DHASH_SIZE = 16  # 16x16 = 256-bit difference hash


@dataclass
class ImageFacts:
    """What the audit reads from one file."""

    sha256: str
    width: int = 0
    height: int = 0
    mode: str = ""
    bit_depth: int = 0
    dhash: np.ndarray | None = None  # 32 packed bytes
    error: str | None = None


def difference_hash(gray: np.ndarray, size: int = DHASH_SIZE) -> np.ndarray:
    """Perceptual difference hash: is each pixel brighter than its right neighbour, on a
    (size x size+1) thumbnail. Returned as packed bits (size*size/8 bytes)."""
    thumb = Image.fromarray(np.asarray(gray, np.float32), mode="F").resize(
        (size + 1, size), Image.Resampling.BOX)
    pixels = np.asarray(thumb)
    return np.packbits(pixels[:, 1:] > pixels[:, :-1])


def image_facts(path: str) -> ImageFacts:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return ImageFacts(sha256="", error=f"cannot read file ({exc.strerror or exc})")
    facts = ImageFacts(sha256=hashlib.sha256(data).hexdigest())
    try:
        facts.dhash = difference_hash(read_image(path, data))
        facts.width, facts.height, facts.mode, facts.bit_depth = header_facts(path, data)
    except ImageReadError as error:
        facts.error = error.reason
    return facts


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int,
                         chunk: int = 256) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= ``max_distance``."""
    pairs = []
    for start in progress(range(0, len(hashes), chunk), desc="audit: near-duplicate search",
                          unit="block"):
        block = hashes[start:start + chunk]
        distance = np.bitwise_count(block[:, None, :] ^ hashes[None, :, :]).sum(-1)
        for i, j in zip(*np.nonzero(distance <= max_distance)):
            if start + i < j:
                pairs.append((int(start + i), int(j), int(distance[i, j])))
    return pairs


def _groups(n: int, pairs) -> list[list[int]]:
    """Connected components of the duplicate pairs (union-find), singletons left out."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        parent[find(i)] = find(j)
    members = defaultdict(list)
    for i in range(n):
        members[find(i)].append(i)
    return [m for m in members.values() if len(m) > 1]


@dataclass
class AuditResult:
    summary: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def leak(self) -> bool:
        return bool(self.summary["cross_split_duplicates"] or self.summary["patient_leaks"])

    def to_dict(self) -> dict:
        return {**self.summary, "warnings": self.warnings, "leak": self.leak}


def _table(rows: list, columns: list) -> dict:
    """Cross-tabulation: {row value: {column value: count}}."""
    table = defaultdict(Counter)
    for row, column in zip(rows, columns):
        table[row][column] += 1
    return {a: dict(sorted(c.items())) for a, c in sorted(table.items())}


def separating_values(values: list[str], labels: list[str], min_share: float = 0.95,
                      min_images: int = 10) -> list[dict]:
    """Property values (e.g. an image size) that occur almost only in one class."""
    overall = Counter(labels)
    found = []
    for value, count in Counter(values).items():
        if count < max(min_images, 0.02 * len(values)):
            continue
        per_class = Counter(label for v, label in zip(values, labels) if v == value)
        label, top = per_class.most_common(1)[0]
        if top / count >= min_share and overall[label] / len(labels) < min_share:
            found.append({"value": value, "images": count, "class": label,
                          "share": top / count})
    return sorted(found, key=lambda f: -f["images"])


def audit(records: list[Record],
          near_distance: int | None = EVALUATION.near_distance, separability: bool = True,
          segmenter=None) -> AuditResult:
    """Audit labelled records (with splits if they have them). ``near_distance=None`` skips
    the perceptual-hash search; ``separability`` measures how well image statistics alone
    separate each source's classes (``image_statistics_separability``; ``segmenter``: with the
    lung crop among the options)."""
    facts = [image_facts(r.path) for r in progress(records, desc="audit: reading images")]
    readable = [i for i, f in enumerate(facts) if f.error is None]
    good = [records[i] for i in readable]
    result = AuditResult()
    s = result.summary
    s["images"] = len(records)
    s["unreadable"] = [{"path": records[i].path, "reason": f.error}
                       for i, f in enumerate(facts) if f.error]
    labels = [r.label for r in good]
    s["counts"] = _table([r.split or "unsplit" for r in good], labels)
    s["sources"] = _table([r.source for r in good if r.source],
                          [r.label for r in good if r.source])
    single = {src: next(iter(c)) for src, c in s["sources"].items() if len(c) == 1}
    s["single_class_sources"] = single
    for source, label in single.items():
        result.warnings.append(
            f"source '{source}' supplies only class {label} ({s['sources'][source][label]} "
            f"images): a model can score by recognising the source instead of the disease; "
            f"evaluate per source and leave one source out")
    s["positive_share_per_source"] = {
        source: float(np.mean([r.target for r in good if r.source == source]))
        for source in s["sources"]}
    s["confounded_sources"] = confounded_sources(good)
    for source, reason in s["confounded_sources"].items():
        if source not in single:
            result.warnings.append(f"source '{source}' is {reason}: the source predicts the "
                                   f"class")
    properties = {
        "size": [f"{facts[i].width}x{facts[i].height}" for i in readable],
        "aspect": ["square" if facts[i].width == facts[i].height else "not square"
                   for i in readable],
        "mode": [facts[i].mode for i in readable],
        "bit_depth": [str(facts[i].bit_depth) for i in readable],
    }
    s["properties"] = {name: _table(values, labels) for name, values in properties.items()}
    s["image_statistics"] = image_statistics_separability(good, segmenter=segmenter) \
        if separability else {}
    result.warnings += separability_warnings(s["image_statistics"])
    s["separating_properties"] = {}
    for name, values in properties.items():
        found = separating_values(values, labels)
        if found:
            s["separating_properties"][name] = found
        for f in found:
            result.warnings.append(
                f"image {name} {f['value']}: {f['images']} images, {f['share']:.0%} of them "
                f"{f['class']}; the {name} alone tells the class apart for these images")

    by_hash = defaultdict(list)
    for i in readable:
        by_hash[facts[i].sha256].append(i)
    exact_pairs = [(g[0], j, 0) for g in by_hash.values() if len(g) > 1 for j in g[1:]]
    near_pairs = []
    if near_distance is not None and readable:
        hashes = np.stack([facts[i].dhash for i in readable])
        near_pairs = [(readable[a], readable[b], d)
                      for a, b, d in near_duplicate_pairs(hashes, near_distance)
                      if facts[readable[a]].sha256 != facts[readable[b]].sha256]
    s["near_distance"] = near_distance

    def describe(group):
        return {"paths": [records[i].path for i in group],
                "labels": sorted({records[i].label for i in group}),
                "splits": sorted({records[i].split for i in group if records[i].split})}

    s["exact_duplicates"] = [describe(g) for g in _groups(len(records), exact_pairs)]
    s["near_duplicates"] = [{**describe([i, j]), "distance": d} for i, j, d in near_pairs]
    all_groups = [describe(g) for g in _groups(len(records), exact_pairs + near_pairs)]
    s["label_conflicts"] = [g for g in all_groups if len(g["labels"]) > 1]
    s["cross_split_duplicates"] = [g for g in all_groups if len(g["splits"]) > 1]
    s["patient_leaks"] = patients_across_splits(good)

    findings = [
        ("unreadable", "{n} files cannot be read and are skipped"),
        ("exact_duplicates", "{n} groups of identical files"),
        ("near_duplicates", f"{{n}} pairs of near-duplicate images (difference-hash distance "
                            f"<= {near_distance} of 256 bits)"),
        ("label_conflicts", "{n} duplicate groups carry different labels (label conflicts)"),
        ("cross_split_duplicates", "LEAK: {n} duplicate groups span more than one split: test "
                                   "images the model has seen"),
        ("patient_leaks", "LEAK: {n} patients appear in more than one split"),
    ]
    result.warnings += [text.format(n=len(s[key])) for key, text in findings if s[key]]
    return result


def exact_duplicates_across_splits(records: list[Record],
                                   hashes: dict[str, str]) -> list[dict]:
    """The cheap check ``train`` runs: identical files (by ``hashes``, path -> sha256) in more
    than one split."""
    by_hash = defaultdict(list)
    for r in records:
        by_hash[hashes[r.path]].append(r)
    return [{"paths": [r.path for r in group], "splits": sorted({r.split for r in group})}
            for group in by_hash.values() if len({r.split for r in group}) > 1]


def format_audit(result: AuditResult) -> str:
    s = result.summary
    lines = [f"images: {s['images']}  unreadable: {len(s['unreadable'])}", "",
             "counts per split and class:"]
    for split, counts in s["counts"].items():
        lines.append(f"  {split:<8} " + "  ".join(f"{c}={n}" for c, n in counts.items()))
    if s["sources"]:
        classes = sorted({c for counts in s["sources"].values() for c in counts})
        lines += ["", "source x class:", "  " + f"{'source':<14}" +
                  "".join(f"{c:>12}" for c in classes)]
        for source, counts in s["sources"].items():
            flag = "  <- one class only" if source in s["single_class_sources"] else ""
            lines.append(f"  {source:<14}" + "".join(f"{counts.get(c, 0):>12}" for c in classes)
                         + flag)
    if s.get("confounded_sources"):
        kept = sorted(set(s["sources"]) - set(s["confounded_sources"]))
        lines += ["", "a model trained on these sources learns which source it sees, not the "
                  "disease:"]
        lines += [f"  {source}: {reason}" for source, reason in s["confounded_sources"].items()]
        lines.append("  train and crossval leave them out by default (--exclude-confounded) and "
                     "train on the others (" + (", ".join(kept) or "none left") + "); judge a "
                     "model on a source it never saw with 'covidxray crossval --by source'")
    lines += format_separability(s.get("image_statistics") or {})
    lines.append("")
    groups = [("exact duplicate groups", s["exact_duplicates"]),
              ("near-duplicate pairs" + ("" if s["near_distance"] is not None
                                         else " (not searched)"), s["near_duplicates"]),
              ("label conflicts", s["label_conflicts"]),
              ("duplicates across splits", s["cross_split_duplicates"])]
    for title, found in groups:
        lines.append(f"{title}: {len(found)}")
        lines += _listed(found)
    lines.append(f"patients in more than one split: {len(s['patient_leaks'])}")
    lines += [f"  {patient}: {', '.join(splits)}"
              for patient, splits in list(s["patient_leaks"].items())[:SHOWN_GROUPS]]
    if len(s["patient_leaks"]) > SHOWN_GROUPS:
        lines.append(f"  ... and {len(s['patient_leaks']) - SHOWN_GROUPS} more (all in the JSON)")
    lines.append("")
    lines += [f"WARNING: {w}" for w in result.warnings] or ["no warnings"]
    return "\n".join(lines)


def format_separability(found: dict) -> list[str]:
    """The image-statistics table of each two-class source, for the screen."""
    if not found:
        return []
    lines = ["", "how well image statistics alone separate each source's classes (cross-"
             "validated ROC-AUC; 0.5 = not at all):"]
    for source, result in found.items():
        lines.append(f"  {source} ({result['images']} images, {result['positive']} positive): "
                     f"size and aspect {result['size_and_aspect']:.2f}")
        for name, values in result["options"].items():
            mark = "  <- lowest" if name == result["lowest"] else ""
            lines.append(f"    {name:<22} thumbnail {values['thumbnail']:.2f}  histogram "
                         f"{values['histogram']:.2f}{mark}")
    return lines


SHOWN_GROUPS = 5  # groups named on screen per finding; the JSON has them all
SHOWN_FILES = 4  # files named per group


def _listed(groups: list[dict]) -> list[str]:
    """The first groups, each with its first files, labels and splits; then how many more."""
    lines = []
    for group in groups[:SHOWN_GROUPS]:
        paths = group["paths"]
        more = f" (+{len(paths) - SHOWN_FILES} more)" if len(paths) > SHOWN_FILES else ""
        detail = ", ".join(filter(None, ["labels " + "/".join(group["labels"]),
                                         "splits " + "/".join(group["splits"])
                                         if group["splits"] else ""]))
        lines.append(f"  {' = '.join(paths[:SHOWN_FILES])}{more}  [{detail}]")
    if len(groups) > SHOWN_GROUPS:
        lines.append(f"  ... and {len(groups) - SHOWN_GROUPS} more (all in the JSON)")
    return lines


def failures(result: AuditResult, fail_on) -> list[str]:
    """The findings among ``fail_on`` (of ``config.AUDIT_FINDINGS``) that the audit made."""
    s = result.summary
    found = {"leak": result.leak, "conflict": bool(s["label_conflicts"]),
             "duplicate": bool(s["exact_duplicates"] or s["near_duplicates"]),
             "confounding": bool(s.get("confounded_sources"))}
    return [name for name in fail_on if found[name]]
