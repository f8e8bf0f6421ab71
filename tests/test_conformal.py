import numpy as np
import pytest

from covidxray.errors import UserError
from covidxray.run.conformal import UNCERTAIN, UNLIKE, ConformalSets, coverage, hinge, p_values

CLASSES = ["NON-COVID", "COVID"]


def scores(rng, n, separation):
    """P(COVID) of n films per class, the classes ``separation`` apart on the logit scale."""
    y = np.repeat([0, 1], n)
    logits = rng.normal(0, 1, 2 * n) + separation * (y - 0.5)
    return 1 / (1 + np.exp(-logits)), y


@pytest.mark.parametrize("confidence", [0.90, 0.95])
def test_coverage_holds_per_class_and_a_hard_set_is_more_often_uncertain(confidence):
    rng = np.random.default_rng(0)
    rates = {}
    for name, separation in (("easy", 6.0), ("hard", 1.0)):
        calibration = ConformalSets.fit(*scores(rng, 300, separation), CLASSES, confidence)
        test, y = scores(rng, 3000, separation)
        sets = calibration.sets(test)
        held = coverage(sets, [CLASSES[t] for t in y], CLASSES)
        for cls in CLASSES:  # the promise, per class, within sampling noise
            assert held[cls]["coverage"] >= confidence - 0.02, (name, cls, held)
        rates[name] = np.mean([len(s) == 2 for s in sets])
    assert rates["hard"] > rates["easy"] + 0.2


def test_the_numpy_sets_are_crepes_sets():
    """Applying a fitted set is plain numpy; it gives crepes' own (non-smoothed) answer."""
    from crepes import ConformalClassifier
    rng = np.random.default_rng(1)
    probabilities, y = scores(rng, 80, 2.0)
    fitted = ConformalClassifier().fit(hinge(probabilities)[np.arange(len(y)), y], bins=y)
    new = rng.random(200)
    theirs = np.stack([fitted.predict_p(hinge(new)[:, c], bins=np.full(200, c),
                                        smoothing=False).ravel() for c in (0, 1)], axis=1)
    ours = ConformalSets.fit(probabilities, y, CLASSES)
    np.testing.assert_allclose(p_values(ours.calibration, hinge(new)), theirs)


def test_verdicts_and_saving(tmp_path):
    sets = ConformalSets.fit(np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9] * 10),
                             np.array([0, 0, 0, 1, 1, 1] * 10), CLASSES, 0.9)
    assert sets.verdict(["COVID"]) == "COVID"
    assert sets.verdict(["NON-COVID", "COVID"]) == UNCERTAIN and sets.verdict([]) == UNLIKE
    assert sets.sets([0.95, 0.05]) == [["COVID"], ["NON-COVID"]]
    sets.save(tmp_path / "c.npz")
    again = ConformalSets.load(tmp_path / "c.npz")
    assert again.sets([0.95, 0.5, 0.05]) == sets.sets([0.95, 0.5, 0.05])
    assert again.confidence == 0.9 and again.classes == CLASSES
    with pytest.raises(UserError, match="both classes"):
        ConformalSets.fit([0.1, 0.2], [0, 0], CLASSES)


def test_the_default_level_is_the_training_default():
    """One place for it: config.TrainConfig.confidence."""
    from covidxray.config import TrainConfig
    from covidxray.run.conformal import DEFAULT_CONFIDENCE
    sets = ConformalSets.fit(np.array([0.1, 0.9] * 10), np.array([0, 1] * 10), CLASSES)
    assert sets.confidence == DEFAULT_CONFIDENCE == TrainConfig("data", "out").confidence
