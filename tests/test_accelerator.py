"""Mixed precision is switched on for GPUs (or on request) and undone afterwards."""

import keras
import numpy as np
import pytest

from covidxray.model.accelerator import MIXED_POLICY, gpu_name, precision_for_hardware
from covidxray.model.network import OUTPUT_NAME, build_model


def test_mixed_precision_on_request_keeps_the_output_in_float32():
    before = keras.config.dtype_policy().name
    with precision_for_hardware("on") as policy:
        assert policy == MIXED_POLICY
        model = build_model(32, weights="none")
        scores = model.predict(np.full((2, 32, 32, 1), 100, np.uint8), verbose=0)
    assert keras.config.dtype_policy().name == before
    assert model.get_layer(OUTPUT_NAME).compute_dtype == "float32"
    assert model.get_layer("pool").compute_dtype == "bfloat16"
    assert scores.dtype == np.float32 and np.all((scores >= 0) & (scores <= 1))


def test_auto_follows_the_hardware():
    with precision_for_hardware("auto") as policy:
        assert policy == (MIXED_POLICY if gpu_name() else keras.config.dtype_policy().name)
    with precision_for_hardware("off") as policy:
        assert policy != MIXED_POLICY
    with pytest.raises(ValueError, match="auto, on or off"):
        with precision_for_hardware("fast"):
            pass
