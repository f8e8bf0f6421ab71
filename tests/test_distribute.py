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


def odd_split(tiny_data, path):
    """20 training images (patients 0-4 of each class) and 7 validation images (patients 5-6,
    one image of the last COVID patient left out): no split divides by 2 devices but the
    training one."""
    rows = ["path,split"]
    for label in ("COVID", "NON-COVID"):
        for index, image in enumerate(sorted((tiny_data / label).glob("*.png"))):
            patient = index // 2
            if patient < 5:
                rows.append(f"{image},train")
            elif not (label == "COVID" and index == 13):
                rows.append(f"{image},val")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.slow
def test_two_devices_follow_one_and_the_run_works_under_jax(tiny_data, tmp_path):
    """20 training images, global batch 10: each step's gradient is the mean over the same 10
    images whether one device computes it or two compute halves of it; the 7 validation images
    are scored on both devices all the same (padded with copies that weigh nothing)."""
    pytest.importorskip("jax")
    two, one = tmp_path / "two", tmp_path / "one"
    split = ["--split", str(odd_split(tiny_data, tmp_path / "split.csv"))]
    trained = subprocess.run([*CLI, "train", str(tiny_data), "--out", str(two), *JAX_ARGS,
                              *split, "--distribute"], env=JAX, capture_output=True, text=True,
                             timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "data parallel over 2 devices" in trained.stderr
    subprocess.run([*CLI, "train", str(tiny_data), "--out", str(one), *JAX_ARGS, *split],
                   env=JAX, check=True, capture_output=True, timeout=900)
    differences = np.concatenate([np.abs(a - b).ravel()
                                  for a, b in zip(weights_of(two), weights_of(one))])
    print("weight differences, 2 devices against 1: largest", differences.max(), "median",
          np.median(differences))  # 1.6e-03 and 8e-08 when written
    # Adam divides each step by the gradient's own scale: a weight whose gradient is about 0
    # moves by up to the learning rate (1e-3) a step on float rounding alone; 2 epochs of 2
    # steps
    assert differences.max() < 4 * 1e-3 and np.median(differences) < 1e-6
    metadata = json.loads((two / "metadata.json").read_text())
    assert metadata["backend"] == "jax" and metadata["split_counts"]["val"] == {
        "COVID": 3, "NON-COVID": 4}
    # two devices score the 7 validation films as one does, epoch by epoch (the padding
    # copies of a data-parallel pass are not counted), and choose the same epoch
    import csv
    for field in ("val_auc",):
        scores = [[float(row[field]) for row in csv.DictReader(open(run / "history.csv"))]
                  for run in (two, one)]
        assert scores[0] == pytest.approx(scores[1], abs=0.09)
    assert metadata["selection"]["epoch"] == json.loads(
        (one / "metadata.json").read_text())["selection"]["epoch"]

    evaluated = subprocess.run([*CLI, "evaluate", str(two), str(tiny_data), "--bootstrap", "50"],
                               env=JAX, capture_output=True, text=True, timeout=300)
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


@pytest.mark.parametrize("images, batch, steps", [(16, 16, 1), (15, 14, 1), (40, 32, 1),
                                                  (64, 32, 2)])
def test_every_batch_splits_evenly_over_the_devices(images, batch, steps, caplog):
    """Whole batches only, each a multiple of the devices; a training set smaller than the
    global batch gets one batch of as many as split evenly, said in the log."""
    from covidxray.training.distribute import fit_to_devices
    from covidxray.training.pipeline import ViewBatches
    batches = ViewBatches([np.zeros((images, 3), np.float32)], np.arange(images) % 2,
                          batch_size=32)
    fit_to_devices(batches, 2, "finetune")
    assert (batches.batch_size, len(batches)) == (batch, steps)
    assert all(len(batches[i][0]) % 2 == 0 for i in range(len(batches)))
    assert ("larger than the" in caplog.text) == (images < 32)


def test_fewer_training_images_than_devices_are_refused():
    from covidxray.training.distribute import DistributionError, fit_to_devices
    from covidxray.training.pipeline import ViewBatches
    with pytest.raises(DistributionError, match="3 training images cannot be split over 8"):
        fit_to_devices(ViewBatches([np.zeros((3, 3), np.float32)], np.array([0, 1, 0]),
                                   batch_size=32), 8, "head")



COMPILED = """
import keras
from covidxray.config import AugmentConfig
from covidxray.model.network import build_model
from covidxray.training.phases import _compile
model = build_model(32, "mobilenetv3small", "none", augment=AugmentConfig())
_compile(model, 1e-3)
print(model.jit_compile)
"""


def test_training_with_augmentation_is_compiled_on_jax():
    """Issue 34's case (12 films a class, every epoch option at 1, on 2 devices) aborted in an
    all-reduce in phase 2: Keras' random rotation, zoom and translation layers say they cannot
    be compiled, so the model trained op by op, each op a collective of its own, and two
    devices deadlocked. On jax they compile, and the training step is one XLA program."""
    pytest.importorskip("jax")
    done = subprocess.run([sys.executable, "-c", COMPILED], env=JAX, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "True"
