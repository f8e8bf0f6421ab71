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

import csv
import io
import shutil
import warnings
from pathlib import Path

import numpy as np

from covidxray.fileutil import atomic_path, write_json_atomic
from covidxray.run.engines import ONNX_FILE, OnnxEngine
from covidxray.run.metadata import METADATA_FILE
from covidxray.run.conformal import CONFORMAL_FILE
from covidxray.run.ood import OOD_FILE
from covidxray.run.predictor import LUNGS_FOLDER, LUNGS_ONNX, Predictor

FORMATS = ("onnx",)
PARITY_IMAGES = 32


def export(run_dir: str | Path, out: str | Path, format: str = "onnx") -> dict:
    """Export ``run_dir`` to the folder ``out``; returns what ``export.json`` records."""
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose from {FORMATS}")
    run_dir, out = Path(run_dir), Path(out)
    predictor = Predictor.load(run_dir)
    if predictor.metadata.members:
        return export_ensemble(predictor, run_dir, out, format)
    if predictor.model is None:
        raise ValueError(f"{run_dir} is an exported model already; export its run folder")
    out.mkdir(parents=True, exist_ok=True)
    graph = predictor.engine.inference_graph()
    import keras
    size = predictor.image_size
    with atomic_path(out / ONNX_FILE, suffix=".onnx") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes it fixes, not ours
        graph.export(str(tmp), format="onnx", verbose=False,
                     input_signature=[keras.InputSpec(shape=(None, size, size, 1),
                                                      dtype="float32")])
    _copy_run_files(run_dir, out)
    images = parity_images(predictor)
    keras_scores = predictor.engine.forward(images).scores
    onnx_scores = OnnxEngine(out / ONNX_FILE).forward(images).scores
    record = {"format": format, "source_run": str(run_dir.resolve()),
              "model_id": predictor.metadata.model_id,
              "backend": keras.backend.backend(), "keras": keras.__version__,
              "parity_images": len(images),
              "parity_max_abs_difference": float(np.max(np.abs(keras_scores - onnx_scores)))}
    if predictor.segmenter is not None:
        record["lung_segmenter"] = export_segmenter(predictor.segmenter, out / LUNGS_FOLDER,
                                                    images)
    write_json_atomic(out / "export.json", record)
    return record


def _copy_run_files(run_dir: Path, out: Path) -> None:
    """What a prediction needs besides the model: metadata, gate, prediction sets."""
    for name in (METADATA_FILE, OOD_FILE, CONFORMAL_FILE):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / name)


def export_ensemble(predictor: Predictor, run_dir: Path, out: Path, format: str) -> dict:
    """An ensemble as a folder of exported members (each its own ONNX graph, run by
    onnxruntime) beside the ensemble's own metadata, gate and sets; its parity is the whole
    ensemble's P(COVID) against the run's."""
    members = {name: export(run_dir / name, out / name, format)
               for name in predictor.metadata.members}
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
        record["lung_segmenter"] = export_segmenter(predictor.segmenter, out / LUNGS_FOLDER,
                                                    images[:, 0])
    write_json_atomic(out / "export.json", record)
    return record


def export_segmenter(segmenter, folder: Path, images: np.ndarray) -> dict:
    """The lung segmenter as ``folder/lungs.onnx`` with its card, and its parity with the Keras
    segmenter (largest difference of P(lung) on ``images`` as the segmenter reads them)."""
    segmenter.export_onnx(folder / LUNGS_ONNX)
    inputs = segmenter.inputs([image / 255.0 for image in images[:8]])
    exported = type(segmenter).from_onnx(folder / LUNGS_ONNX, segmenter.card)
    return {"name": segmenter.card.name, "sha256": segmenter.card.sha256,
            "parity_max_abs_difference": float(np.max(np.abs(
                segmenter.probabilities(inputs) - exported.probabilities(inputs))))}


def _validation_paths(run_dir: Path) -> list[str]:
    """Up to ``PARITY_IMAGES`` of a run's validation files."""
    split = run_dir / "split.csv"
    with open(split, newline="") if split.is_file() else io.StringIO("path,split\n") as rows:
        return [row["path"] for row in csv.DictReader(rows)
                if row["split"] == "val"][:PARITY_IMAGES]


def parity_images(predictor: Predictor) -> np.ndarray:
    """Up to ``PARITY_IMAGES`` of the run's validation images as the model gets them (random
    pixels where the run's images cannot be read here)."""
    images = [x.image for batch in predictor.prepare_many(_validation_paths(predictor.run_dir))
              for x in batch if not hasattr(x, "error")]
    if images:
        return np.stack(images)
    size = predictor.image_size
    return np.random.default_rng(0).integers(0, 256, (8, size, size), dtype=np.uint8)
