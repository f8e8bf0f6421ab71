import numpy as np
import pytest

from covidxray.metrics import expected_calibration_error
from covidxray.run.calibration import apply_temperature, fit_temperature


def test_temperature_scaling_recovers_a_planted_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 5000)
    y = (rng.random(5000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    overconfident = 1 / (1 + np.exp(-3 * true_logits))  # logits three times too large
    t = fit_temperature(y, overconfident)
    assert t == pytest.approx(3, rel=0.1)
    assert expected_calibration_error(y, apply_temperature(overconfident, t)) < \
        expected_calibration_error(y, overconfident)
