import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from covidxray.metrics import binary_metrics, bootstrap_ci, choose_threshold, confusion


def planted(n=300, separation=1.0, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n), np.zeros(n)].astype(int)
    scores = np.r_[rng.normal(separation, 1, n), rng.normal(0, 1, n)]
    return y, scores


def test_metrics_match_scikit_learn():
    y, s = planted(seed=1)
    threshold = 0.4
    got = binary_metrics(y, s, threshold)
    pred = (s >= threshold).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert got["specificity"] == pytest.approx(skm.recall_score(1 - y, 1 - pred))
    assert got["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert got["npv"] == pytest.approx(tn / (tn + fn))
    assert got["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert got["pr_auc"] == pytest.approx(skm.average_precision_score(y, s))
    assert confusion(y, pred) == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


@pytest.mark.parametrize("seed", range(5))
def test_areas_match_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) + 0.3 * y, 1)  # coarse scores: many ties
    got = binary_metrics(y, s, 0.5)
    assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, s))
    assert got["pr_auc"] == pytest.approx(skm.average_precision_score(y, s))


def test_undefined_metrics_are_nan_not_errors():
    got = binary_metrics([1, 1, 1], [0.2, 0.6, 0.9], 0.5)
    assert got["sensitivity"] == pytest.approx(2 / 3)
    assert np.isnan(got["specificity"]) and np.isnan(got["roc_auc"])


def test_bootstrap_ci_covers_the_true_auc():
    # two unit normals one apart: the population ROC-AUC is Phi(1/sqrt(2))
    true_auc = norm.cdf(1 / np.sqrt(2))
    covered = 0
    for seed in range(20):
        y, s = planted(n=150, seed=seed)
        low, high = bootstrap_ci(y, s, 0.5, n_resamples=300, seed=seed)["roc_auc"]
        assert low < binary_metrics(y, s, 0.5)["roc_auc"] < high
        covered += low <= true_auc <= high
    assert covered >= 16  # nominal 95%: at least 16 of 20 is expected with near certainty


def test_bootstrap_ci_of_sensitivity_covers_planted_rate():
    true_sensitivity = 1 - norm.cdf(0.5 - 1.0)  # P(N(1,1) >= 0.5)
    y, s = planted(n=400, seed=7)
    low, high = bootstrap_ci(y, s, 0.5, n_resamples=500)["sensitivity"]
    assert low <= true_sensitivity <= high and high - low < 0.12


def test_youden_threshold_on_planted_case():
    # equal-variance normals at 0 and 2: Youden's J is maximal half-way, at 1
    y, s = planted(n=2000, separation=2.0, seed=3)
    assert choose_threshold(y, s) == pytest.approx(1.0, abs=0.15)


def test_target_sensitivity_threshold():
    y, s = planted(n=500, seed=4)
    t = choose_threshold(y, s, "sensitivity", 0.95)
    sens = binary_metrics(y, s, t)["sensitivity"]
    assert sens >= 0.95
    # the highest such threshold: one step up loses the target
    higher = np.min(s[s > t])
    assert binary_metrics(y, s, higher)["sensitivity"] < 0.95


def test_threshold_needs_both_classes_and_valid_input():
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels"):
        binary_metrics([2, 0], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="finite"):
        binary_metrics([1, 0], [np.nan, 0.2], 0.5)


def test_expected_calibration_error_by_hand():
    # bin [0.1, 0.2): 2 cases at 0.15, 1 positive -> |0.5 - 0.15| = 0.35, weight 2/5
    # bin [0.9, 1.0]: 3 cases at 0.9, 0.95, 1.0, 2 positives -> |2/3 - 0.95| = 0.2833, weight 3/5
    y = [0, 1, 1, 1, 0]
    s = [0.15, 0.15, 0.9, 0.95, 1.0]
    from covidxray.metrics import calibration_bins, expected_calibration_error
    assert expected_calibration_error(y, s) == pytest.approx(0.4 * 0.35 + 0.6 * (0.95 - 2 / 3))
    bins = calibration_bins(y, s)
    assert [b["count"] for b in bins] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 3]
