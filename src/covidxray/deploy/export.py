"""A run as a model that needs no Keras: ``RUN`` -> ``OUT/model.onnx`` (the whole classifier
with its input preprocessing, outputs P(COVID), the embeddings for the out-of-distribution
gate and the logit terms for Grad-CAM), beside the run's ``metadata.json`` and ``ood.npz``.
``covidxray predict`` and ``covidxray serve`` take that folder as they take a run, and run it
with onnxruntime alone.

Export goes through Keras' own ``Model.export(format="onnx")``: on the torch backend by
``torch.onnx`` (with ``onnxscript``), on jax by ``jax2onnx``, on tensorflow by ``tf2onnx``.
The parity of the exported model with the run (largest difference of P(COVID) on the run's
validation images) is measured at export and written to ``OUT/export.json``.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from covidxray.config import EXPORT_FORMATS
from covidxray.errors import ConfigError, UserError, require
from covidxray.fileutil import file_sha256, write_json_atomic
from covidxray.run.engines import OnnxEngine
from covidxray.run.folder import RunFolder
from covidxray.run.metadata import RunError
from covidxray.run.predictor import Predictor

PARITY_IMAGES = 32


def export(run_dir: str | Path, out: str | Path, format: str = EXPORT_FORMATS[0],
           force: bool = False) -> dict:
    """Export ``run_dir`` to the folder ``out``; returns what ``export.json`` records.

    ``out`` must be new, empty, or an earlier export of the same run (replaced); anything
    else (another run above all) is refused unless ``force``. The export is written to a
    temporary folder beside ``out`` and swapped in whole, so a failure leaves ``out`` as it
    was."""
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose from {EXPORT_FORMATS}")
    for module in ("onnx", "onnxscript", "onnxruntime"):
        require(module, "covidxray export", "export")
    run_dir, out = Path(run_dir), Path(out)
    if RunFolder(run_dir).is_exported:
        raise RunError(f"{run_dir} is an exported model already; export its run folder")
    predictor = Predictor.load(run_dir, runtime="keras")  # what is exported is the Keras model
    _check_target(out, predictor.metadata.model_id, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        record = _export_into(predictor, run_dir, partial, format)
        _swap_in(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def _check_target(out: Path, model_id: str, force: bool) -> None:
    """Refuse to overwrite anything but an earlier export of the same run."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out} is a file, not a folder for the export")
    if force or not any(out.iterdir()):
        return
    target = RunFolder(out)
    earlier = target.export_record() if target.export_file.is_file() else {}
    if earlier.get("model_id") == model_id:
        return
    what = (f"an export of another model ({earlier.get('model_id')})" if earlier else
            "a run" if target.metadata_file.exists() or target.keras_file.exists() else
            "files that are not an export of this run")
    raise UserError(f"{out} holds {what}: export to a new or empty folder, or pass --force to "
                    f"replace it")


def _swap_in(partial: Path, out: Path) -> None:
    """``partial`` becomes ``out``; what ``out`` held is removed only once that is done."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    os.replace(partial, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_into(predictor: Predictor, run_dir: Path, out: Path, format: str) -> dict:
    """The export of a loaded run (or ensemble) written into the folder ``out``."""
    if predictor.metadata.members:
        return export_ensemble(predictor, run_dir, out, format)
    import keras
    target = RunFolder(out)
    predictor.engine.export_onnx(target.onnx_file)
    _copy_run_files(run_dir, out)
    images = parity_images(predictor)
    keras_scores = predictor.engine.forward(images).scores
    onnx_scores = OnnxEngine(target.onnx_file).forward(images).scores
    record = {"format": format, "source_run": str(run_dir.resolve()),
              "model_id": predictor.metadata.model_id,
              "onnx_sha256": file_sha256(target.onnx_file),
              "backend": keras.backend.backend(), "keras": keras.__version__,
              "parity_images": len(images),
              "parity_max_abs_difference": float(np.max(np.abs(keras_scores - onnx_scores)))}
    if predictor.segmenter is not None:
        record["lung_segmenter"] = export_segmenter(predictor.segmenter, target, images)
    write_json_atomic(target.export_file, record)
    return record


def _copy_run_files(run_dir: Path, out: Path) -> None:
    """What a prediction needs besides the model: metadata, gate, prediction sets."""
    source, target = RunFolder(run_dir), RunFolder(out)
    for name in ("metadata_file", "gate_file", "sets_file"):
        if getattr(source, name).is_file():
            shutil.copyfile(getattr(source, name), getattr(target, name))


def export_ensemble(predictor: Predictor, run_dir: Path, out: Path, format: str) -> dict:
    """An ensemble as a folder of exported members (each its own ONNX graph, run by
    onnxruntime) beside the ensemble's own metadata, gate and sets; its parity is the whole
    ensemble's P(COVID) against the run's."""
    members = {}
    for name, member in zip(predictor.metadata.members, predictor.engine.members):
        members[name] = _export_into(member, run_dir / name, out / name, format)
    _copy_run_files(run_dir, out)
    exported = Predictor.load(out)
    images = np.stack([x.image for batch in exported.prepare_many(_validation_paths(run_dir))
                       for x in batch if not hasattr(x, "error")])
    record = {"format": format, "source_run": str(run_dir.resolve()),
              "model_id": predictor.metadata.model_id, "members": members,
              "parity_images": len(images),
              "parity_max_abs_difference": float(np.max(np.abs(
                  predictor.predict_prepared(images) - exported.predict_prepared(images))))}
    if predictor.segmenter is not None:
        record["lung_segmenter"] = export_segmenter(predictor.segmenter, RunFolder(out),
                                                    images[:, 0])
    write_json_atomic(RunFolder(out).export_file, record)
    return record


def export_segmenter(segmenter, folder: RunFolder, images: np.ndarray) -> dict:
    """The lung segmenter as the exported folder's ``lungs/lungs.onnx`` with its card, and its
    parity with the Keras segmenter (largest difference of P(lung) on ``images`` as the
    segmenter reads them)."""
    segmenter.export_onnx(folder.lungs_onnx_file)
    inputs = segmenter.inputs([image / 255.0 for image in images[:8]])
    exported = type(segmenter).from_onnx(folder.lungs_onnx_file, segmenter.card)
    return {"name": segmenter.card.name, "sha256": segmenter.card.sha256,
            "parity_max_abs_difference": float(np.max(np.abs(
                segmenter.probabilities(inputs) - exported.probabilities(inputs))))}


def _validation_paths(run_dir: Path) -> list[str]:
    """Up to ``PARITY_IMAGES`` of a run's validation files."""
    return RunFolder(run_dir).split_paths("val")[:PARITY_IMAGES]


def parity_images(predictor: Predictor) -> np.ndarray:
    """Up to ``PARITY_IMAGES`` of the run's validation images as the model gets them (random
    pixels where the run's images cannot be read here)."""
    images = [x.image for batch in predictor.prepare_many(_validation_paths(predictor.run_dir))
              for x in batch if not hasattr(x, "error")]
    if images:
        return np.stack(images)
    size = predictor.image_size
    return np.random.default_rng(0).integers(0, 256, (8, size, size), dtype=np.uint8)
