"""Networks on onnxruntime: a Keras network exported once, by Keras' own ONNX export, into
the cache folder (``fileutil.cache_dir``), named by the sha256 of the weights it was made from,
then run by an onnxruntime session. Keras trains; this is how a trained network answers
without Keras, PyTorch or JAX: several times faster on a CPU, and seconds less to start.

Importing this module imports neither Keras nor onnxruntime."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path

from covidxray.fileutil import atomic_path, cache_dir

log = logging.getLogger(__name__)

ONNX_FOLDER = "onnx"  # under the cache folder
# The form of the graphs ``export_keras`` writes; a new form is exported anew into the cache.
# 2: batch normalisation folded into the convolutions (``model.onnxgraph``)
GRAPH_FORM = 2
# What Keras' ONNX export needs on each backend (torch's is in covidxray[export]).
EXPORTERS = {"torch": ("onnx", "onnxscript"), "jax": ("onnx", "jax2onnx"),
             "tensorflow": ("onnx", "tf2onnx")}


def available() -> bool:
    """Whether onnxruntime is installed (covidxray[export])."""
    return importlib.util.find_spec("onnxruntime") is not None


def can_export() -> bool:
    """Whether Keras' ONNX export can run here, on the backend Keras is (or will be) on:
    the modules ``EXPORTERS`` names for it are installed."""
    import covidxray.model.backend  # noqa: F401  (the backend's default, before it is read)
    needed = EXPORTERS.get(os.environ["KERAS_BACKEND"])
    return needed is not None and all(importlib.util.find_spec(name) for name in needed)


def versions() -> dict:
    """The versions of what makes and runs an export (None: not installed): an export refused
    by one set is tried again by another."""
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for name in ("keras", "onnx", "onnxruntime", *sorted({m for e in EXPORTERS.values()
                                                           for m in e} - {"onnx"})):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def cache_file(name: str) -> Path:
    """Where the network called ``name`` (its kind and weights' hash) is kept as ONNX."""
    return cache_dir() / ONNX_FOLDER / f"{name}-g{GRAPH_FORM}.onnx"


def export_keras(model, path: Path) -> None:
    """``model`` (a Keras model of (n, size, size, channels) float32 input) as ONNX at
    ``path``, its batch normalisation folded into the convolutions (``model.onnxgraph``),
    written to a temporary name and renamed: a half-written file is never found."""
    import keras

    from covidxray.model.onnxgraph import fold_batch_norms
    shape = (None, *model.input_shape[1:])
    with atomic_path(path, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes, not ours
        model.export(str(tmp), format="onnx", verbose=False,
                     input_signature=[keras.InputSpec(shape=shape, dtype="float32")])
        try:
            fold_batch_norms(tmp)
        except Exception as error:  # a graph the fold does not know: slower, still right
            log.warning("%s kept as exported, its batch normalisation not folded (%s: %s)",
                        path.name, type(error).__name__, error)


def session(path: Path):
    """An onnxruntime session of the network at ``path``, on the CPU."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its notes on unused initialisers are not ours
    # batches of every size come and go (a server's shared passes): per-shape memory plans
    # would keep each, and the arena its largest (see run_options)
    options.enable_mem_pattern = False
    # idle threads sleep rather than spin: a server runs several sessions from several threads
    # at once, and on two cores spinning threads take the time the others need (its answers
    # came 20% faster without; docs/benchmarks.md)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_options():
    """Options for every ``session.run``: the arena keeps what a run needs while it runs (fast),
    and gives back what it does not hold after each (a worker's memory stays flat)."""
    import onnxruntime
    options = onnxruntime.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options
