"""Data-parallel training through keras.distribution, end to end under jax: the command line
trains on 2 virtual CPU devices with the same weights as on one device, and the run evaluates
and predicts like any other; on torch, a clear refusal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from test_cli import TRAIN_ARGS, add_bad_files

JAX = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
       # the processes below compile the same functions: they share what XLA compiled
       "JAX_COMPILATION_CACHE_DIR": os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                 "covidxray-test-jax-cache"),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
CLI = [sys.executable, "-m", "covidxray"]
# XLA compiles once per batch shape and layer mix: full batches (10 of 20 training images), no
# augmentation layers and no head phase keep the compiling to seconds
# not --quiet: the test reads the log line that names the devices
JAX_ARGS = [*(a for a in TRAIN_ARGS if a != "--quiet"), "--image-size", "32", "--batch-size",
            "10", "--head-epochs", "0",
            "--finetune-epochs", "2", "--no-augment", "--no-source-augment",
            "--test-time-views", "0"]
WEIGHTS = """
import sys, numpy as np, keras
import covidxray.model.network
model = keras.saving.load_model(sys.argv[1])
np.savez(sys.argv[2], *[keras.ops.convert_to_numpy(w) for w in model.weights])
"""


def weights_of(run):
    subprocess.run([sys.executable, "-c", WEIGHTS, str(run / "model.keras"),
                    str(run / "weights.npz")], env=JAX, check=True, capture_output=True)
    with np.load(run / "weights.npz") as saved:
        return [saved[k] for k in sorted(saved.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
def test_two_devices_follow_one_and_the_run_works_under_jax(tiny_data, tmp_path):
    """20 training images, global batch 10: each step's gradient is the mean over the same 10
    images whether one device computes it or two compute halves of it."""
    pytest.importorskip("jax")
    two, one = tmp_path / "two", tmp_path / "one"
    trained = subprocess.run([*CLI, "train", str(tiny_data), "--out", str(two), *JAX_ARGS,
                              "--distribute"], env=JAX, capture_output=True, text=True,
                             timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "data parallel over 2 devices" in trained.stderr
    subprocess.run([*CLI, "train", str(tiny_data), "--out", str(one), *JAX_ARGS], env=JAX,
                   check=True, capture_output=True, timeout=900)
    largest = max(float(np.abs(a - b).max()) for a, b in zip(weights_of(two), weights_of(one)))
    print("largest weight difference, 2 devices against 1:", largest)  # 7.7e-05 when written
    # Adam divides each step by the gradient's own scale: a weight whose gradient is about 0
    # moves by up to the learning rate (1e-3) a step on float rounding alone
    assert largest < 1e-3
    assert json.loads((two / "metadata.json").read_text())["backend"] == "jax"

    evaluated = subprocess.run([*CLI, "evaluate", str(two), "--bootstrap", "50"], env=JAX,
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    bad = add_bad_files(tmp_path / "in")
    predicted = subprocess.run([*CLI, "predict", str(two), str(bad), str(tiny_data / "COVID"),
                                "--json"], env=JAX, capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 1
    results = json.loads(predicted.stdout)["predictions"]
    assert sum(r["error"] is None for r in results) == len(list((tiny_data / "COVID").iterdir()))


def test_the_torch_backend_says_what_to_do(tiny_data, tmp_path):
    import keras

    import covidxray
    from covidxray.training.distribute import DistributionError
    if keras.backend.backend() == "jax":
        pytest.skip("this process runs jax")
    with pytest.raises(DistributionError, match="KERAS_BACKEND=jax"):
        covidxray.train(tiny_data, tmp_path / "run", distribute=True, image_size=32,
                        backbone="mobilenetv3small", weights="none", finetune_epochs=1)
