"""The one place that asks the backend library about hardware; everything else uses Keras.

On a GPU, training switches to bfloat16 mixed precision (the sigmoid output stays float32) and
``model.compile`` keeps Keras' ``jit_compile="auto"``, which compiles with XLA on jax and
tensorflow. Measured for ResNet50 on one H100: Keras on the jax backend trains at about the
speed of raw PyTorch, on the torch backend at about a sixth of it: GPU users should run
``KERAS_BACKEND=jax``.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import contextlib
import logging

import keras

from covidxray.errors import ConfigError

log = logging.getLogger(__name__)

MIXED_POLICY = "mixed_bfloat16"


def gpu_name() -> str | None:
    """The first GPU the active Keras backend will run on, or None."""
    backend = keras.backend.backend()
    try:
        if backend == "torch":
            import torch
            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        if backend == "jax":
            import jax
            gpus = [d for d in jax.devices() if d.platform == "gpu"]
            return gpus[0].device_kind if gpus else None
        if backend == "tensorflow":
            import tensorflow as tf
            gpus = tf.config.list_physical_devices("GPU")
            return gpus[0].name if gpus else None
    except Exception as error:  # a broken driver: run on the CPU, say why
        log.warning("cannot query the GPU (%s); running on the CPU", error)
    return None


@contextlib.contextmanager
def precision_for_hardware(mixed_precision: str = "auto"):
    """Within the block, Keras' dtype policy is mixed bfloat16 when ``mixed_precision`` is
    "on", or "auto" with a GPU present; the previous policy comes back afterwards."""
    if mixed_precision not in ("auto", "on", "off"):
        raise ConfigError(f"mixed_precision must be auto, on or off, got {mixed_precision!r}")
    gpu = gpu_name() if mixed_precision != "off" else None
    use = mixed_precision == "on" or (mixed_precision == "auto" and gpu is not None)
    previous = keras.config.dtype_policy()
    if use:
        keras.config.set_dtype_policy(MIXED_POLICY)
        log.info("mixed precision: %s on %s", MIXED_POLICY, gpu or "the CPU")
    try:
        yield MIXED_POLICY if use else previous.name
    finally:
        keras.config.set_dtype_policy(previous)
