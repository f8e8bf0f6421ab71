"""Audit a data set for what makes a chest X-ray classifier look better than it is.

Source x class confounding, image properties that separate the classes, exact and near
duplicates (within and across splits and classes), label conflicts, and patients found in more
than one split. The cheap parts (exact duplicates and patients across splits) also run inside
``train``.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from covidxray.config import EVALUATION, LUNG_CROP, Preprocessing
from covidxray.data.dataset import DataError, Record
from covidxray.data.split import patients_across_splits
from covidxray.pixels.imageio import ImageReadError, header_facts, prepare, read_image
from covidxray.progress import progress

DHASH_SIZE = 16  # 16x16 = 256-bit difference hash
CONFOUNDING_GAP = 0.3  # a source whose positive share differs this much from the whole set's

# image statistics that give a source's classes away: cross-validated ROC-AUC at or above this
SEPARABILITY_WARNING = 0.75
SEPARABILITY_FOLDS = 5
MIN_PER_CLASS = 10  # fewer images of a class in a source: its separability is not measured
STATISTICS_SIZE = 64  # the images are prepared at this size for the thumbnail and histogram
HISTOGRAM_BINS = 32
# the pixel options the audit tries on each two-class source (the lung crop too, where the
# caller gives the lung segmenter): how much of the class each leaves in the image statistics
AS_THEY_ARE = "as they are"
RUN_PIXELS = "this run's pixels"  # what training measures beside the files as they are
PIXEL_OPTIONS = {
    AS_THEY_ARE: Preprocessing(STATISTICS_SIZE),
    "crop 8%": Preprocessing(STATISTICS_SIZE, "none", 0.08),
    "percentile + crop 8%": Preprocessing(STATISTICS_SIZE, "percentile", 0.08),
    "equalize + crop 8%": Preprocessing(STATISTICS_SIZE, "equalize", 0.08),
    "clahe + crop 8%": Preprocessing(STATISTICS_SIZE, "clahe", 0.08),
}
LUNG_OPTIONS = {
    "equalize + lungs": Preprocessing(STATISTICS_SIZE, "equalize", LUNG_CROP),
    "clahe + lungs": Preprocessing(STATISTICS_SIZE, "clahe", LUNG_CROP),
}


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


def confounded_sources(records: list[Record], by_share: bool = True) -> dict[str, str]:
    """Sources that would teach a model which source it sees rather than the disease, each with
    the reason: a single class, or (``by_share``) a positive share CONFOUNDING_GAP or more away
    from the whole data set's. Records without a source are not judged.

    ``by_share=False`` is the criterion for a model of three or more classes: only a
    single-label source is left out. Such a model learns COVID against the other classes
    within each source, and the collections that bring other pneumonias bring COVID beside
    them in their own proportions (ieee8023: four COVID films to one pneumonia): leaving them
    out for their share would leave no pneumonia to learn from."""
    by_source = defaultdict(list)
    for r in records:
        if r.source:
            by_source[r.source].append(r.target if by_share else r.label.lower())
    found = {}
    if not by_share:
        for source, labels in sorted(by_source.items()):
            if len(set(labels)) == 1:
                found[source] = f"one class only ({len(labels)} {labels[0]} images)"
        return found
    overall = float(np.mean([t for targets in by_source.values() for t in targets] or [0]))
    for source, targets in sorted(by_source.items()):
        share = float(np.mean(targets))
        if share in (0.0, 1.0):
            found[source] = (f"one class only ({len(targets)} "
                             f"{'positive' if share else 'negative'} images)")
        elif abs(share - overall) >= CONFOUNDING_GAP:
            found[source] = f"{share:.0%} positive against {overall:.0%} in the whole data set"
    return found


def select_sources(records: list[Record], include=None, exclude=(),
                   exclude_confounded: bool = False,
                   by_share: bool = True) -> tuple[list[Record], dict[str, str]]:
    """The records of the sources chosen for training, and each source left out with why.

    ``include``: only these sources (None: all); ``exclude``: not these; ``exclude_confounded``:
    not those ``confounded_sources`` names (``by_share``: its criterion), judged on the whole
    data set (nothing to judge when no record names its source).
    """
    if include is None and not exclude and (not exclude_confounded
                                            or not any(r.source for r in records)):
        return records, {}
    unsourced = [r.path for r in records if not r.source]
    if unsourced:
        raise DataError(f"{len(unsourced)} images have no source (e.g. {unsourced[0]}): choosing "
                        f"sources needs a source column or --source-from-prefix")
    known = sorted({r.source for r in records})
    unknown = sorted((set(include or ()) | set(exclude)) - set(known))
    if unknown:
        raise DataError(f"unknown source(s) {', '.join(unknown)}; the data has {', '.join(known)}")
    left_out = {}
    for source in known:
        if include is not None and source not in include:
            left_out[source] = "not among the sources chosen (--sources)"
        elif source in exclude:
            left_out[source] = "left out by --exclude-sources"
    if exclude_confounded:
        for source, reason in confounded_sources(records, by_share).items():
            left_out.setdefault(source, f"confounded: {reason}")
    kept = [r for r in records if r.source not in left_out]
    if len({r.target for r in kept}) < 2:
        remaining = ", ".join(sorted({r.source for r in kept})) or "none"
        raise DataError(f"the sources left for training ({remaining}) do not hold both classes;"
                        f" left out: " + "; ".join(f"{s} ({why})" for s, why in left_out.items()))
    return kept, left_out


def _statistics(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A prepared (STATISTICS_SIZE square) uint8 image -> its 16x16 thumbnail and its
    grey-level histogram (shares of HISTOGRAM_BINS bins)."""
    block = image.shape[0] // 16
    thumb = image.reshape(16, block, 16, block).mean(axis=(1, 3)).ravel() / 255.0
    counts = np.bincount(image.ravel().astype(np.int64) * HISTOGRAM_BINS // 256,
                         minlength=HISTOGRAM_BINS)
    return thumb, counts / counts.sum()


def _cross_validated_auc(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int) -> float:
    """ROC-AUC of out-of-fold P(positive) of a regularised, balanced logistic regression on
    standardised ``x``, folds grouped by patient (where known) and stratified by class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    folds = StratifiedGroupKFold(SEPARABILITY_FOLDS, shuffle=True, random_state=seed)
    scores = np.zeros(len(y))
    for train, test in folds.split(x, y, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(
            C=0.1, class_weight="balanced", max_iter=5000))
        model.fit(x[train], y[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return float(roc_auc_score(y, scores))


def image_statistics_separability(records: list[Record], options: dict | None = None,
                                  segmenter=None, seed: int = 0) -> dict:
    """For each source with both classes (at least MIN_PER_CLASS images each; records without
    a source count as one source), how well image statistics alone tell its classes apart:
    the cross-validated ROC-AUC of a logistic regression on 16x16 thumbnails and on the
    grey-level histogram, under each of ``options`` (name -> ``Preprocessing``; default
    ``PIXEL_OPTIONS``, and ``LUNG_OPTIONS`` with a ``segmenter``), and on the file's width,
    height and aspect. What a source gives away here, a network can learn instead of the
    disease; the options that bring it down are the ones to train with."""
    if options is None:
        options = {**PIXEL_OPTIONS, **(LUNG_OPTIONS if segmenter is not None else {})}
    by_source = defaultdict(list)
    for r in records:
        by_source[r.source or "(no source)"].append(r)
    found = {}
    for source, members in sorted(by_source.items()):
        counts = Counter(r.target for r in members)
        if min(counts[0], counts[1]) < MIN_PER_CLASS:
            continue
        stats = {name: ([], []) for name in options}
        sizes, kept = [], []
        for r in progress(members, desc=f"audit: image statistics of {source}"):
            try:
                data = Path(r.path).read_bytes()
                gray = read_image(r.path, data)
                width, height, _, _ = header_facts(r.path, data)
            except (OSError, ImageReadError):
                continue
            lungs = segmenter.field(gray) if segmenter is not None and any(
                spec.uses_lungs for spec in options.values()) else None
            for name, spec in options.items():
                thumb, histogram = _statistics(prepare(gray, spec, lungs))
                stats[name][0].append(thumb)
                stats[name][1].append(histogram)
            sizes.append([np.log(width), np.log(height), width / height])
            kept.append(r)
        y = np.array([r.target for r in kept])
        groups = [r.group for r in kept]
        result = {"images": len(kept), "positive": int(y.sum()),
                  "size_and_aspect": _cross_validated_auc(np.array(sizes), y, groups, seed),
                  "options": {name: {"thumbnail": _cross_validated_auc(np.array(t), y, groups,
                                                                         seed),
                                     "histogram": _cross_validated_auc(np.array(h), y, groups,
                                                                         seed)}
                              for name, (t, h) in stats.items()}}
        worst = {name: max(v.values()) for name, v in result["options"].items()}
        result["lowest"] = min(worst, key=worst.get)
        found[source] = result
    return found


def separability_warnings(found: dict) -> list[str]:
    """One warning per source whose classes its image statistics give away."""
    warnings = []
    for source, result in found.items():
        plain = result["options"].get(AS_THEY_ARE) or next(iter(result["options"].values()))
        worst = max(max(plain.values()), result["size_and_aspect"])
        if worst < SEPARABILITY_WARNING:
            continue
        best = RUN_PIXELS if RUN_PIXELS in result["options"] else result["lowest"]
        after = result["options"][best]
        advice = (f"as this run prepares its images they still give {after['thumbnail']:.2f} "
                  f"and {after['histogram']:.2f}" if best == RUN_PIXELS else
                  f"'{best}' brings the thumbnail and histogram down to "
                  f"{after['thumbnail']:.2f} and {after['histogram']:.2f}; train with it")
        warnings.append(
            f"source '{source}': image statistics alone tell its classes apart (cross-validated "
            f"ROC-AUC: 16x16 thumbnail {plain['thumbnail']:.2f}, grey-level histogram "
            f"{plain['histogram']:.2f}, size and aspect {result['size_and_aspect']:.2f}): its "
            f"classes likely come from different collections, and a model can learn that "
            f"instead of the disease; {advice}, and judge the model on a source it never saw")
    return warnings


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
