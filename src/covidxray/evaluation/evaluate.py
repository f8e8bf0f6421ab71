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
from covidxray.evaluation.explain import group_means, hidden, shortcut_check
from covidxray.metrics import (
    METRIC_NAMES,
    roc_auc_ci,
    binary_metrics,
    bootstrap_ci,
    calibration_bins,
    confusion,
    curves,
    expected_calibration_error,
)
from covidxray.pixels.decode import ImageReadError
from covidxray.pixels.lungfield import heat_shares
from covidxray.progress import progress
from covidxray.run.conformal import coverage
from covidxray.evaluation.result import EvaluationResult
from covidxray.run.folder import RunFolder
from covidxray.run.inputs import Prepared
from covidxray.run.predictor import Predictor

log = logging.getLogger(__name__)
SCORING_SLICE = 256  # images per scoring call, so a long evaluation shows progress


def run_test_records(run_dir: Path, positive_class: str, source_from_prefix: bool) -> list[Record]:
    """The test split a run was trained with, from its ``split.csv``."""
    folder = RunFolder(run_dir)
    if not folder.split_file.is_file():
        raise DataError(f"{run_dir}: no {folder.split_file.name}; pass the data to evaluate "
                        f"explicitly")
    records = [r for r in folder.read_split(positive_class) if r.split == "test"]
    if not records:
        raise DataError(f"{folder.split_file}: the run has no test split; pass the data to "
                        f"evaluate")
    if source_from_prefix:
        records = [replace(r, source=r.source or source_from_filename(r.path)) for r in records]
    return records


class LungMasks:
    """Each image's lungs on its model input (``Prepared.lungs_on_input``), kept as packed bits
    (a 224 px mask in 6 KB); None where none were found."""

    def __init__(self, size: int):
        self.size, self.packed = size, []

    def append(self, mask: np.ndarray | None) -> None:
        self.packed.append(None if mask is None else np.packbits(mask))

    def __getitem__(self, index: int) -> np.ndarray | None:
        packed = self.packed[index]
        if packed is None:
            return None
        return np.unpackbits(packed, count=self.size * self.size).reshape(
            self.size, self.size).astype(bool)

    def __len__(self) -> int:
        return len(self.packed)


def prepared_images(predictor: Predictor, records: list[Record],
                    strict: bool = False) -> tuple[LoadedImages, LungMasks]:
    """``records``' images as the run's ``Predictor`` prepares them, and their lungs;
    unreadable ones are logged and skipped (``strict``: the first one raises)."""
    images, kept, failures = [], [], []
    masks = LungMasks(predictor.image_size)
    batches = predictor.prepare_many([r.path for r in records])
    items = progress((item for batch in batches for item in batch), total=len(records),
                     desc="evaluate: reading images")
    for record, item in zip(records, items):
        if isinstance(item, Prepared):
            images.append(item.image)  # the decoded original is not kept: memory
            masks.append(item.lungs_on_input())
            kept.append(record)
            continue
        if strict:
            raise ImageReadError(item.path, item.error)
        log.warning("skipped %s: %s", item.path, item.error)
        failures.append(ImageReadError(item.path, item.error))
    size = predictor.image_size
    return LoadedImages(np.stack(images) if images else np.zeros((0, size, size), np.uint8),
                        kept, failures), masks


MIN_CONTRAST_IMAGES = 10  # per class: fewer, and a contrast is not scored


def view_group(view: str) -> str:
    """PA, AP (AP supine included) or "" (not said, or another view)."""
    view = view.strip().upper()
    return "AP" if view.startswith("AP") else "PA" if view == "PA" else ""


def contrasts(records: list[Record], scores: np.ndarray, positive_class: str,
              n_bootstrap: int, seed: int) -> dict:
    """ROC-AUC of the positive class against each negative class the original labels name
    (COVID against another pneumonia, COVID against no finding), with intervals; overall and
    within each view (PA only, AP only) where the records say their view, so that a score
    the view or the style explains shows as such."""
    labels = np.array([r.label for r in records])
    views = np.array([view_group(r.view) for r in records])
    out = {}
    for group in ["all", "PA", "AP"]:
        inside = np.ones(len(records), bool) if group == "all" else views == group
        for other in sorted(set(labels) - {positive_class}):
            chosen = inside & np.isin(labels, [positive_class, other])
            y = (labels[chosen] == positive_class).astype(int)
            if min(y.sum(), (1 - y).sum()) < MIN_CONTRAST_IMAGES:
                continue
            out.setdefault(group, {})[f"{positive_class} vs {other}"] = roc_auc_ci(
                y, np.asarray(scores)[chosen], n_bootstrap, seed=seed)
    return out


def class_table(records: list[Record], probabilities: np.ndarray, classes: list[str]) -> dict:
    """A model of three or more classes: the confusion matrix of its most probable class
    against each film's own (by its original label; films of other labels are left out),
    and each class's recall and precision."""
    index = {name.lower(): i for i, name in enumerate(classes)}
    truth = np.array([index.get(r.label.lower(), -1) for r in records])
    called = probabilities.argmax(axis=1)
    known = truth >= 0
    matrix = np.zeros((len(classes), len(classes)), int)
    np.add.at(matrix, (truth[known], called[known]), 1)
    per_class = {}
    for i, name in enumerate(classes):
        actual, predicted = matrix[i].sum(), matrix[:, i].sum()
        per_class[name] = {"n": int(actual),
                           "recall": float(matrix[i, i] / actual) if actual else float("nan"),
                           "precision": float(matrix[i, i] / predicted) if predicted
                           else float("nan")}
    return {"classes": classes, "confusion": matrix.tolist(), "per_class": per_class,
            "accuracy": float(np.trace(matrix) / matrix.sum()) if matrix.sum() else float("nan"),
            "left_out": int((~known).sum())}


def set_summary(conformal, sets: list[list[str]], records: list[Record],
                confidence: float) -> dict:
    """How the prediction sets held on labelled films: coverage and the shares of uncertain
    and unlike films per class (what the confidence promises per class), per source and
    overall."""
    classes = conformal.classes
    truth = [classes[r.target] for r in records]
    overall = coverage(sets, truth, classes)
    by_source = defaultdict(list)
    for index, record in enumerate(records):
        if record.source:
            by_source[record.source].append(index)
    return {"confidence": confidence, "classes": classes,
            "calibration_images": conformal.sizes,
            "uncertain_rate": float(np.mean([len(s) == 2 for s in sets])),
            "unlike_rate": float(np.mean([len(s) == 0 for s in sets])),
            "per_class": overall,
            "per_source": {source: coverage([sets[i] for i in index], [truth[i] for i in index],
                                            classes)
                           for source, index in sorted(by_source.items())}}


def lung_summary(records: list[Record], shares: np.ndarray, masks: LungMasks,
                 segmenter: bool) -> dict:
    """The share of Grad-CAM heat inside the lungs found, averaged per class and per source,
    beside what an even spread would give (the lungs' share of the model's input)."""
    found = np.isfinite(shares)
    areas = np.array([masks[i].mean() if found[i] else np.nan for i in range(len(masks))])
    return {"segmenter": segmenter, "images": len(records), "lungs_found": int(found.sum()),
            "heat_in_lungs": float(np.nanmean(shares)) if found.any() else None,
            "lung_area_share": float(np.nanmean(areas)) if found.any() else None,
            "per_class": group_means(shares, [r.label for r in records]),
            "per_source": group_means(shares, [r.source for r in records if r.source])
            if all(r.source for r in records) else {}}


# the lungs-hidden test warns where the lower end of the 95% interval of ROC-AUC with the lungs
# hidden lies above this: the model tells the classes apart well above chance without them
LUNGS_HIDDEN_WARNING = 0.6


def lungs_hidden(predictor: Predictor, images: np.ndarray, records: list[Record],
                 masks: LungMasks, scores: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """The lungs-hidden test (Maguolo and Nanni, 2021): the same films scored twice more, with
    their lungs (grown a little) filled with the film's mean grey level, and with everything
    but their lungs filled; ROC-AUC with intervals beside the films' own, overall and per
    source with both classes. Films without plausible lungs are left out (counted). Warns
    where the lungs-hidden figure is well above chance: the model reads something outside the
    lungs (framing, text, the body around them, the collection's look)."""
    found = np.array([i for i in range(len(masks)) if masks[i] is not None], int)
    out = {"films": len(masks), "films_with_lungs": int(found.size), "warning_above":
           LUNGS_HIDDEN_WARNING, "overall": None, "per_source": {}, "warnings": []}
    y = np.array([records[i].target for i in found], int)
    if found.size == 0 or not 0 < y.sum() < y.size:
        return out
    without, only = [], []
    for start in range(0, found.size, SCORING_SLICE):
        chosen = found[start:start + SCORING_SLICE]
        lungs = [masks[i] for i in chosen]
        without.append(predictor.predict_prepared(hidden(images[chosen], lungs, inside=True)))
        only.append(predictor.predict_prepared(hidden(images[chosen], lungs, inside=False)))
    figures = {"as_they_are": np.asarray(scores)[found], "lungs_hidden": np.concatenate(without),
               "lungs_only": np.concatenate(only)}

    def scored(index) -> dict:
        return {name: roc_auc_ci(y[index], values[index], n_bootstrap, seed=seed)
                for name, values in figures.items()}

    out["overall"] = scored(np.arange(found.size))
    sources = np.array([records[i].source for i in found])
    for source in sorted(set(sources.tolist()) - {""}):
        index = np.flatnonzero(sources == source)
        if 0 < y[index].sum() < index.size:
            out["per_source"][source] = scored(index)
    for name, result in [("all films", out["overall"]), *out["per_source"].items()]:
        hidden_auc = result["lungs_hidden"]
        if np.isfinite(hidden_auc["ci95"][0]) and hidden_auc["ci95"][0] > LUNGS_HIDDEN_WARNING:
            out["warnings"].append(
                f"WARNING ({name}): with the lungs hidden the model still tells the classes "
                f"apart, ROC-AUC {hidden_auc['value']:.3f} (95% CI {hidden_auc['ci95'][0]:.3f}-"
                f"{hidden_auc['ci95'][1]:.3f}; {result['as_they_are']['value']:.3f} with them): "
                f"it uses something outside the lungs (the framing, text or markers, the body "
                f"around them, the look of a collection), not only the disease")
    return out


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
             shortcut_images: int = 200,
             records: list[Record] | None = None) -> EvaluationResult:
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
        data_name = f"{RunFolder(run_dir).split_file} (test split)"
    else:
        data = data if isinstance(data, (list, tuple)) else [data]
        dataset = discover(list(data), meta.positive_class, source_from_prefix, strict)
        records = dataset.records
        data_name = " + ".join(map(str, data))
        if meta.data_root in {str(Path(root).resolve()) for root in dataset.roots
                              or [dataset.root]}:
            log.warning("%s holds the training data: its train and validation images are "
                        "scored too; omit DATA to evaluate on the run's test split only",
                        data_name)
    loaded, masks = prepared_images(predictor, records, strict)
    if not loaded.records:
        raise DataError(f"{data_name}: no readable images to evaluate")
    scores, shares, probabilities, embeddings = [np.zeros(0, np.float32)], [np.zeros(0)], [], []
    for start in progress(range(0, len(loaded.images), SCORING_SLICE), desc="evaluate: scoring",
                          unit="slice"):
        chosen = range(start, min(start + SCORING_SLICE, len(loaded.images)))
        result = predictor.forward_prepared(loaded.images[start:chosen.stop])
        scores.append(result.scores)
        shares.append(heat_shares(result.logit_maps, [masks[i] for i in chosen]))
        embeddings.append(result.embeddings)
        if result.probabilities is not None:
            probabilities.append(result.probabilities)
    scores, shares = np.concatenate(scores), np.concatenate(shares)
    y_true = loaded.targets.astype(int)
    threshold = predictor.threshold
    labels = [r.label for r in loaded.records]
    sets = predictor.conformal.sets(scores) if predictor.conformal else [None] * len(scores)
    result = EvaluationResult(
        notice=meta.notice, synthetic_data=meta.synthetic_data, run=str(run_dir),
        data=data_name, threshold=threshold, threshold_method=meta.threshold_method,
        positive_class=meta.positive_class,
        unreadable_files=[{"path": e.path, "reason": e.reason} for e in loaded.failures],
        overall=summarise(y_true, scores, threshold, n_bootstrap, seed),
        per_class=called_per_class(loaded.records, scores, threshold),
        per_source=per_source(loaded.records, scores, threshold, n_bootstrap, seed),
        calibration={"ece": expected_calibration_error(y_true, scores),
                     "bins": calibration_bins(y_true, scores), "temperature": meta.temperature},
        histogram={"edges": np.linspace(0, 1, 21).tolist(), **{
            label: np.histogram(scores[np.array(labels) == label], bins=20,
                                range=(0, 1))[0].tolist() for label in sorted(set(labels))}},
        cases=[{"path": r.path, "label": r.label, "target": r.target, "source": r.source,
                "score": float(score), "prediction_set": chosen,
                "lung_heat_share": None if not np.isfinite(share) else float(share)}
               for r, score, share, chosen in zip(loaded.records, scores, shares, sets)],
        lungs=lung_summary(loaded.records, shares, masks, predictor.segmenter is not None),
        contrasts=contrasts(loaded.records, scores, meta.positive_class, n_bootstrap, seed))
    if 0 < y_true.sum() < y_true.size:
        operating = binary_metrics(y_true, scores, threshold)
        result.curves = {**curves(y_true, scores),
                         "operating_point": {"fpr": 1 - operating["specificity"],
                                             "tpr": operating["sensitivity"],
                                             "precision": operating["ppv"]}}
    if predictor.conformal:
        result.prediction_sets = set_summary(predictor.conformal, sets, loaded.records,
                                             meta.confidence)
    if predictor.gate is not None:
        drift = predictor.gate.drift(np.concatenate(embeddings))
        result.drift = None if drift is None else drift.to_dict()
    if predictor.segmenter is not None:
        result.lungs_hidden = lungs_hidden(predictor, loaded.images, loaded.records, masks,
                                           scores, n_bootstrap, seed)
    if shortcut_images:
        sample = np.random.default_rng(seed).permutation(len(labels))[:shortcut_images]
        result.shortcut = shortcut_check(
            predictor, loaded.images[sample], [labels[i] for i in sample],
            lung_masks=[masks[i] for i in sample],
            sources=[loaded.records[i].source for i in sample]
            if all(r.source for r in loaded.records) else None).to_dict()
    if probabilities:
        result.classes = class_table(loaded.records, np.concatenate(probabilities),
                                     meta.output_classes)
    result.save(Path(out) if out else evaluation_file(run_dir, None if own_test_split
                                                       else data or data_name))
    return result


def called_per_class(records: list[Record], scores: np.ndarray, threshold: float) -> dict:
    """Per original class: its films, and how many the threshold calls positive."""
    by_class = defaultdict(list)
    for index, record in enumerate(records):
        by_class[record.label].append(index)
    out = {}
    for label, index in sorted(by_class.items()):
        called_positive = np.asarray(scores)[index] >= threshold
        out[label] = {"n": len(index), "called_positive": int(called_positive.sum()),
                      "called_positive_rate": float(called_positive.mean())}
    return out


def evaluation_file(run_dir: Path, data) -> Path:
    """Where an evaluation is written by default: the run's own test split to
    ``RUN/metrics.json`` (what the report shows); other data (one data set or several)
    beside it, under ``RUN/evaluations/``, named by the data, so no evaluation overwrites
    another."""
    folder = RunFolder(run_dir)
    if data is None:
        return folder.metrics_file
    parts = data if isinstance(data, (list, tuple)) else [data]
    resolved = [str(Path(d).resolve()) for d in parts]
    digest = hashlib.sha256("|".join(resolved).encode()).hexdigest()[:8]
    name = "+".join(Path(r).stem or "data" for r in resolved)
    return folder.evaluations_folder / f"{name}-{digest}.json"
