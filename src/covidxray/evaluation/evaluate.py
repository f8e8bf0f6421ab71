"""Score a run on labelled data at its frozen threshold: metrics with bootstrap CIs, confusion
matrix, and the same per source and per original class."""

from __future__ import annotations

import hashlib
import logging
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidxray.data.dataset import DataError, LoadedImages, Record, discover, \
    source_from_filename
from covidxray.data.split import read_split_records
from covidxray.evaluation.explain import shortcut_check
from covidxray.evaluation.metrics import (
    METRIC_NAMES,
    binary_metrics,
    bootstrap_ci,
    calibration_bins,
    confusion,
    curves,
    expected_calibration_error,
)
from covidxray.fileutil import write_json_atomic
from covidxray.pixels.imageio import ImageReadError
from covidxray.progress import progress
from covidxray.run.predictor import Predictor, Prepared

log = logging.getLogger(__name__)
SCORING_SLICE = 256  # images per scoring call, so a long evaluation shows progress


def run_test_records(run_dir: Path, positive_class: str, source_from_prefix: bool) -> list[Record]:
    """The test split a run was trained with, from its ``split.csv``."""
    split_file = run_dir / "split.csv"
    if not split_file.is_file():
        raise DataError(f"{run_dir}: no split.csv; pass the data to evaluate explicitly")
    records = [r for r in read_split_records(split_file, positive_class) if r.split == "test"]
    if not records:
        raise DataError(f"{split_file}: the run has no test split; pass the data to evaluate")
    if source_from_prefix:
        records = [replace(r, source=r.source or source_from_filename(r.path)) for r in records]
    return records


def prepared_images(predictor: Predictor, records: list[Record],
                    strict: bool = False) -> LoadedImages:
    """``records``' images as the run's ``Predictor`` prepares them; unreadable ones are logged
    and skipped (``strict``: the first one raises)."""
    images, kept, failures = [], [], []
    batches = predictor.prepare_many([r.path for r in records])
    items = progress((item for batch in batches for item in batch), total=len(records),
                     desc="evaluate: reading images")
    for record, item in zip(records, items):
        if isinstance(item, Prepared):
            images.append(item.image)  # the decoded original is not kept: memory
            kept.append(record)
            continue
        if strict:
            raise ImageReadError(item.path, item.error)
        log.warning("skipped %s: %s", item.path, item.error)
        failures.append(ImageReadError(item.path, item.error))
    size = predictor.image_size
    return LoadedImages(np.stack(images) if images else np.zeros((0, size, size), np.uint8),
                        kept, failures)


def summarise(y_true: np.ndarray, scores: np.ndarray, threshold: float, n_bootstrap: int,
              seed: int) -> dict:
    """Metrics at ``threshold`` with their bootstrap CIs, and the confusion counts."""
    point = binary_metrics(y_true, scores, threshold)
    intervals = bootstrap_ci(y_true, scores, threshold, n_bootstrap, seed=seed) \
        if n_bootstrap else {name: (float("nan"),) * 2 for name in METRIC_NAMES}
    return {
        "n": int(y_true.size), "n_positive": int(y_true.sum()),
        "metrics": {name: {"value": point[name], "ci95": list(intervals[name])}
                    for name in METRIC_NAMES},
        "confusion": confusion(y_true, scores >= threshold),
    }


def per_source(records: list[Record], scores: np.ndarray, threshold: float, n_bootstrap: int,
               seed: int) -> dict:
    """``summarise`` of each source's images (records without a source are left out)."""
    y_true = np.array([r.target for r in records], dtype=int)
    by_source = defaultdict(list)
    for index, record in enumerate(records):
        if record.source:
            by_source[record.source].append(index)
    return {source: summarise(y_true[index], np.asarray(scores)[index], threshold, n_bootstrap,
                              seed) for source, index in sorted(by_source.items())}


def evaluate(run_dir: str | Path, data: str | Path | None = None, n_bootstrap: int = 1000,
             source_from_prefix: bool = False, out: str | Path | None = None, seed: int = 0,
             strict: bool = False, predictor: Predictor | None = None,
             shortcut_images: int = 200, records: list[Record] | None = None) -> dict:
    """Evaluate a run on ``data`` (default: its own test split; ``records``: these labelled
    images, with their ``target`` as the run's positive class) and write the result to ``out``
    (default: ``evaluation_file``).

    Besides the metrics: calibration, curves, score histograms, per-image scores, and the
    border-shortcut check on up to ``shortcut_images`` images (0 skips it).
    """
    run_dir = Path(run_dir)
    predictor = predictor or Predictor.load(run_dir)
    meta = predictor.metadata
    own_test_split = records is None and data is None
    if records is not None:
        data_name = f"{len(records)} records given"
    elif data is None:
        records = run_test_records(run_dir, meta.positive_class, source_from_prefix)
        data_name = f"{run_dir}/split.csv (test split)"
    else:
        dataset = discover(data, meta.positive_class, source_from_prefix)
        records = dataset.records
        data_name = str(data)
        if str(Path(dataset.root).resolve()) == meta.data_root:
            log.warning("%s is the training data: its train and validation images are scored "
                        "too; omit DATA to evaluate on the run's test split only", data)
    loaded = prepared_images(predictor, records, strict)
    if not loaded.records:
        raise DataError(f"{data_name}: no readable images to evaluate")
    scores = np.concatenate([np.zeros(0, np.float32)] + [
        predictor.predict_prepared(loaded.images[start:start + SCORING_SLICE])
        for start in progress(range(0, len(loaded.images), SCORING_SLICE),
                              desc="evaluate: scoring", unit="slice")])
    y_true = loaded.targets.astype(int)
    threshold = predictor.threshold
    result = {
        "notice": meta.notice,
        "synthetic_data": meta.synthetic_data,
        "run": str(run_dir), "data": data_name,
        "threshold": threshold, "threshold_method": meta.threshold_method,
        "positive_class": meta.positive_class,
        "unreadable_files": [{"path": e.path, "reason": e.reason} for e in loaded.failures],
        "overall": summarise(y_true, scores, threshold, n_bootstrap, seed),
        "per_class": {},
    }
    result["calibration"] = {"ece": expected_calibration_error(y_true, scores),
                             "bins": calibration_bins(y_true, scores),
                             "temperature": meta.temperature}
    if 0 < y_true.sum() < y_true.size:
        operating = binary_metrics(y_true, scores, threshold)
        result["curves"] = {**curves(y_true, scores),
                            "operating_point": {"fpr": 1 - operating["specificity"],
                                                "tpr": operating["sensitivity"],
                                                "precision": operating["ppv"]}}
    labels = [r.label for r in loaded.records]
    result["histogram"] = {"edges": np.linspace(0, 1, 21).tolist(), **{
        label: np.histogram(scores[np.array(labels) == label], bins=20, range=(0, 1))[0].tolist()
        for label in sorted(set(labels))}}
    result["cases"] = [{"path": r.path, "label": r.label, "target": r.target,
                        "source": r.source, "score": float(score)}
                       for r, score in zip(loaded.records, scores)]
    if shortcut_images:
        sample = np.random.default_rng(seed).permutation(len(labels))[:shortcut_images]
        result["shortcut"] = shortcut_check(predictor, loaded.images[sample],
                                            [labels[i] for i in sample]).to_dict()
    result["per_source"] = per_source(loaded.records, scores, threshold, n_bootstrap, seed)
    by_class = defaultdict(list)
    for index, record in enumerate(loaded.records):
        by_class[record.label].append(index)
    for label, index in sorted(by_class.items()):
        called_positive = scores[index] >= threshold
        result["per_class"][label] = {"n": len(index),
                                      "called_positive": int(called_positive.sum()),
                                      "called_positive_rate": float(called_positive.mean())}
    out = Path(out) if out else evaluation_file(run_dir, None if own_test_split
                                                else data or data_name)
    result["metrics_file"] = str(out)
    write_json_atomic(out, result)
    return result


def evaluation_file(run_dir: Path, data: str | Path | None) -> Path:
    """Where an evaluation is written by default: the run's own test split to
    ``RUN/metrics.json`` (what the report shows); other data beside it, under
    ``RUN/evaluations/``, named by the data, so no evaluation overwrites another."""
    if data is None:
        return run_dir / "metrics.json"
    resolved = str(Path(data).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:8]
    return run_dir / "evaluations" / f"{Path(resolved).stem or 'data'}-{digest}.json"


def _fmt(metric: dict) -> str:
    value, (low, high) = metric["value"], metric["ci95"]
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} ({low:.3f}-{high:.3f})" if np.isfinite(low) else f"{value:.3f}"


def format_report(result: dict) -> str:
    """A readable table of an ``evaluate`` result."""
    overall = result["overall"]
    lines = []
    if result["synthetic_data"]:
        lines.append("*** SYNTHETIC DATA: these numbers say nothing about real X-rays ***")
    lines += [f"{result['notice']}",
              f"data: {result['data']}  images: {overall['n']} "
              f"({overall['n_positive']} {result['positive_class']})  "
              f"threshold: {result['threshold']:.4f} ({result['threshold_method']}, frozen on "
              f"validation)", "",
              f"{'metric':<12} value (95% bootstrap CI)"]
    lines += [f"{name:<12} {_fmt(overall['metrics'][name])}" for name in METRIC_NAMES]
    c = overall["confusion"]
    lines += ["", "confusion matrix   predicted +   predicted -",
              f"  actual +         {c['tp']:>11}   {c['fn']:>11}",
              f"  actual -         {c['fp']:>11}   {c['tn']:>11}"]
    lines += ["", f"calibration: expected calibration error {result['calibration']['ece']:.3f}"
              + (f" (temperature {result['calibration']['temperature']:.3f})"
                 if result["calibration"].get("temperature") else "")]
    if "shortcut" in result:
        lines += ["", "shortcut check (outer 15% border vs centre):",
                  "  " + result["shortcut"]["verdict"]]
    if result["per_source"]:
        lines += ["", "per source (a source with one class cannot show discrimination):",
                  f"  {'source':<14}{'n':>6}{'pos':>6}  {'sensitivity':<24}{'specificity':<24}"
                  f"roc_auc"]
        for source, s in result["per_source"].items():
            m = s["metrics"]
            lines.append(f"  {source:<14}{s['n']:>6}{s['n_positive']:>6}  "
                         f"{_fmt(m['sensitivity']):<24}{_fmt(m['specificity']):<24}"
                         f"{_fmt(m['roc_auc'])}")
    lines += ["", "called positive per original class:"]
    lines += [f"  {label:<16} {c['called_positive']:>5} of {c['n']:<5} "
              f"({c['called_positive_rate']:.1%})" for label, c in result["per_class"].items()]
    if result["unreadable_files"]:
        lines += ["", f"{len(result['unreadable_files'])} unreadable files skipped"]
    return "\n".join(lines)
