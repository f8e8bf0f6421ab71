"""Metrics as plain functions of labels and scores: confusion-derived rates, bootstrap CIs,
threshold choice. Pure numpy / scikit-learn, testable without Keras."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_curve

METRIC_NAMES = ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1", "roc_auc", "pr_auc")


def _validate(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true).astype(int).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if y_true.shape != scores.shape:
        raise ValueError(f"{y_true.size} labels but {scores.size} scores")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return y_true, scores


def confusion(y_true, y_pred) -> dict[str, int]:
    """Counts of true/false positives/negatives for binary labels and predictions."""
    y_true = np.asarray(y_true).astype(bool)
    y_pred = np.asarray(y_pred).astype(bool)
    return {"tp": int(np.sum(y_true & y_pred)), "fp": int(np.sum(~y_true & y_pred)),
            "tn": int(np.sum(~y_true & ~y_pred)), "fn": int(np.sum(y_true & ~y_pred))}


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def binary_metrics(y_true, scores, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 at ``threshold`` (score >= threshold is
    positive), and the threshold-free ROC-AUC and PR-AUC (NaN when one class is absent)."""
    y_true, scores = _validate(y_true, scores)
    c = confusion(y_true, scores >= threshold)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    both_classes = 0 < y_true.sum() < y_true.size
    return {
        "accuracy": _ratio(tp + tn, y_true.size),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(y_true, scores) if both_classes else float("nan"),
        "pr_auc": average_precision(y_true, scores) if both_classes else float("nan"),
    }


# The two areas below equal scikit-learn's roc_auc_score and average_precision_score (the tests
# check it) without their input validation, which costs 10x the arithmetic in a bootstrap loop.

def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic (ties count one half)."""
    positives = y_true == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    ranks = rankdata(scores)
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as a step sum over distinct thresholds."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_true = scores[order], y_true[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_true.size - 1]
    true_positives = np.cumsum(sorted_true)[last_of_value]
    precision = true_positives / (last_of_value + 1)
    recall_gain = np.diff(np.r_[0, true_positives]) / true_positives[-1]
    return float(np.sum(recall_gain * precision))


def bootstrap_ci(y_true, scores, threshold: float, n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap confidence intervals of every metric in ``binary_metrics``.

    Cases are resampled with replacement; resamples in which a metric is undefined (e.g. no
    positive case for sensitivity) are left out of that metric's interval.
    """
    y_true, scores = _validate(y_true, scores)
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    rng = np.random.default_rng(seed)
    samples = {name: [] for name in METRIC_NAMES}
    for _ in range(n_resamples):
        index = rng.integers(0, y_true.size, y_true.size)
        for name, value in binary_metrics(y_true[index], scores[index], threshold).items():
            samples[name].append(value)
    tail = (1 - confidence) / 2 * 100
    intervals = {}
    for name, values in samples.items():
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        intervals[name] = (tuple(float(v) for v in np.percentile(values, [tail, 100 - tail]))
                           if values.size else (float("nan"), float("nan")))
    return intervals


def roc_auc_ci(y_true, scores, n_resamples: int = 1000, confidence: float = 0.95,
               seed: int = 0) -> dict:
    """ROC-AUC with its percentile bootstrap interval (resamples with one class left out);
    nan where the cases hold one class only."""
    y_true, scores = _validate(y_true, scores)
    n, positive = y_true.size, int(y_true.sum())
    if not 0 < positive < n:
        return {"value": float("nan"), "ci95": [float("nan")] * 2, "n": n, "n_positive": positive}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        index = rng.integers(0, n, n)
        if 0 < y_true[index].sum() < n:
            values.append(roc_auc(y_true[index], scores[index]))
    tail = (1 - confidence) / 2 * 100
    interval = [float(v) for v in np.percentile(values, [tail, 100 - tail])] if values \
        else [float("nan")] * 2
    return {"value": roc_auc(y_true, scores), "ci95": interval, "n": n, "n_positive": positive}


def choose_threshold(y_true, scores, method: str = "youden",
                     target_sensitivity: float = 0.95) -> float:
    """The operating threshold, chosen on validation data only.

    ``youden`` maximises sensitivity + specificity - 1; ``sensitivity`` takes the highest
    threshold whose sensitivity reaches ``target_sensitivity`` (so specificity is the best
    possible at that sensitivity).
    """
    y_true, scores = _validate(y_true, scores)
    if not 0 < y_true.sum() < y_true.size:
        raise ValueError("choosing a threshold needs both classes in the validation data")
    fpr, tpr, thresholds = roc_curve(y_true, scores, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # scikit-learn's first threshold is +inf
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if method == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    if method == "sensitivity":
        reaching = np.flatnonzero(tpr >= target_sensitivity)
        return float(thresholds[reaching[0]])
    raise ValueError(f"unknown threshold method {method!r}")


def calibration_bins(y_true, scores, n_bins: int = 10) -> list[dict]:
    """Equal-width probability bins: count, mean predicted probability, observed positive rate."""
    y_true, scores = _validate(y_true, scores)
    index = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        bins.append({"low": b / n_bins, "high": (b + 1) / n_bins, "count": count,
                     "mean_predicted": float(scores[members].mean()) if count else float("nan"),
                     "observed_rate": float(y_true[members].mean()) if count else float("nan")})
    return bins


def expected_calibration_error(y_true, scores, n_bins: int = 10) -> float:
    """Sum over bins of (bin share of cases) x |observed rate - mean predicted probability|."""
    bins = calibration_bins(y_true, scores, n_bins)
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["observed_rate"] - b["mean_predicted"])
                     for b in bins if b["count"]))


def curves(y_true, scores) -> dict:
    """ROC and precision-recall curve points (for plotting)."""
    from sklearn.metrics import precision_recall_curve
    y_true, scores = _validate(y_true, scores)
    fpr, tpr, _ = roc_curve(y_true, scores)
    precision, recall, _ = precision_recall_curve(y_true, scores)
    return {"roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()},
            "pr": {"precision": precision.tolist(), "recall": recall.tolist()}}
