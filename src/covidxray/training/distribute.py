"""Training on every accelerator of a machine, or of several machines, through
``keras.distribution``: data parallel on the jax backend (the one GPU users should run).

The batch size is the global batch: each of the N devices gets batch_size / N images per step
and the gradients are averaged over all of them, so a run's learning rate means the same with
one device or eight. (Raising the batch with the device count, scale the learning rate with it:
the linear rule of Goyal et al., 2017, is a good start.)

Several hosts: start the same command on each with jax's multi-process settings in the
environment, ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; ``keras.distribution.initialize()`` reads them and every process then sees
the devices of all.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import contextlib
import logging
import os

from covidxray.errors import UserError

log = logging.getLogger(__name__)

MULTI_HOST_SETTINGS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributionError(UserError, ValueError):
    """Distributed training cannot run as asked; the message says what to do instead."""


def fit_to_devices(batches, devices: int, phase: str) -> None:
    """Data parallel: every step's batch splits evenly over the ``devices``, and only whole
    batches are served (the shuffled rest of an epoch waits for a later one). A training set
    smaller than the global batch gets one batch of as many images as split evenly, said in
    the log; one smaller than the devices cannot be split and is refused."""
    images, size = len(batches.targets), batches.batch_size
    if images < devices:
        raise DistributionError(f"{images} training images cannot be split over {devices} "
                                f"devices: train on more images, or leave --distribute out")
    if images < size:
        fitted = images - images % devices
        log.warning("phase %s: the global batch %d is larger than the %d training images: "
                    "batches of %d (%d per device)%s", phase, size, images, fitted,
                    fitted // devices, f"; {images - fitted} image(s) of each epoch wait for "
                                       f"a later one" if images > fitted else "")
        batches.batch_size = fitted
    batches.drop_remainder = True


@contextlib.contextmanager
def data_parallel(enabled: bool, batch_size: int):
    """Within it, Keras places the model and splits each batch over every device (or does
    nothing when not ``enabled``); yields the number of devices."""
    if not enabled:
        yield 1
        return
    import keras
    if keras.backend.backend() != "jax":
        raise DistributionError(
            f"--distribute trains data parallel on the jax backend; this is "
            f"{keras.backend.backend()}. Run it with KERAS_BACKEND=jax (pip install "
            f"'covidxray[jax]' and a jax build for your accelerators), or leave --distribute out "
            f"to train on one device")
    if all(os.environ.get(name) for name in MULTI_HOST_SETTINGS):
        keras.distribution.initialize()  # reads jax's multi-process settings
    devices = keras.distribution.list_devices()
    if batch_size % len(devices):
        raise DistributionError(f"the batch size ({batch_size}, the global batch) must be a "
                                f"multiple of the {len(devices)} devices")
    log.info("data parallel over %d devices: %s; global batch %d (%d per device)",
             len(devices), ", ".join(devices), batch_size, batch_size // len(devices))
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield len(devices)
    finally:
        keras.distribution.set_distribution(previous)
