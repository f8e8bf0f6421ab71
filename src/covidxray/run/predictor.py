"""Load a run folder into a ``Predictor``: the one path from an input (a file, its bytes or an
array, made the model's input by ``run.inputs``) to a ``Prediction`` (probability, label,
verdict, and the heat map on the input's own pixels). Prediction, serving, explanation and
evaluation all go through it.
"""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from covidxray.config import PREDICT, READ, Preprocessing
from covidxray.model.outputs import cams_from_logit_maps
from covidxray.pixels.decode import ImageReadError, declared_pixels
from covidxray.pixels.lungfield import heat_share
from covidxray.pixels.transforms import uncrop
from covidxray.progress import progress
from covidxray.run.conformal import NOT_FRONTAL, UNCERTAIN
from covidxray.run.engines import KerasEngine, OnnxEngine, load_engine
from covidxray.run.ensemble import EnsembleEngine
from covidxray.run.folder import RunFolder
from covidxray.run.inputs import Prepared, prepare_input
from covidxray.run.metadata import RunError, RunMetadata
from covidxray.run.record import Prediction

log = logging.getLogger(__name__)

RUN_OWN = object()  # Predictor.load's default segmenter: the run's own (None means none)


class Predictor:
    """A trained model with everything needed to use it: its metadata, gate and heat maps."""

    def __init__(self, model_or_engine, metadata: RunMetadata,
                 run_dir: str | Path | None = None, gate=None, segmenter=None,
                 conformal=None):
        """``model_or_engine``: a Keras classifier, or an engine of ``run.engines``;
        ``segmenter``: the ``model.lungs.LungSegmenter`` that finds each input's lungs (for a
        lung crop, the gate and the heat inside the lungs; None: lungs are not looked for);
        ``conformal``: its ``run.conformal.ConformalSets`` (None: no prediction sets)."""
        self.engine = model_or_engine if isinstance(
            model_or_engine, (KerasEngine, OnnxEngine, EnsembleEngine)) \
            else KerasEngine(model_or_engine, metadata.positive_index)
        self.metadata = metadata
        self.run_dir = Path(run_dir) if run_dir else None
        self.gate = gate
        if segmenter is None and metadata.preprocessing.uses_lungs:
            raise RunError(f"{run_dir or 'this run'} needs the lungs found, and no lung segmenter "
                           f"was found (reinstall covidxray: its weights ship with it)")
        self.segmenter = segmenter
        self.conformal = conformal

    @property
    def model(self):
        """The Keras classifier (None for an exported model)."""
        return self.engine.model

    @classmethod
    def load(cls, run_dir: str | Path, segmenter=RUN_OWN, gate: bool = True,
             runtime: str = PREDICT.runtime, _within: tuple[Path, ...] = ()) -> "Predictor":
        """A run folder (``model.keras``), an exported model's folder (``model.onnx``, run
        with onnxruntime alone) or an ensemble's. Every file a prediction depends on is read
        and checked here (``run.folder.RunFolder``): one that is damaged or out of range fails
        now, named. ``segmenter``: the lung segmenter to use instead of the run's own (an
        ensemble's members get the ensemble's, the only one its inputs go through, None
        included); ``gate=False``: no out-of-distribution gate, even where the run has one
        (``--no-gate``: a gate file that cannot be read otherwise stops the load); ``runtime``:
        "onnx" (the run's classifier exported once for onnxruntime: no Keras imported) or
        "keras" (``config.RUNTIMES``)."""
        folder = RunFolder(run_dir)
        folder.require_complete()
        metadata = folder.metadata()
        own = folder.path.resolve()
        if own in _within:
            raise RunError(f"ensemble {folder.path}: its members lead back to itself (a cycle)")
        if segmenter is RUN_OWN:
            segmenter = load_segmenter(folder.path)
        if metadata.members:
            # the members' own gates are not used: the ensemble has its own
            engine = EnsembleEngine([cls.load(member.path, segmenter, False, runtime,
                                              (*_within, own))
                                     for member in folder.member_folders(metadata)])
        else:
            if folder.is_exported:
                folder.check_export()
            engine = load_engine(folder.path, metadata.positive_index, runtime)
            size = engine.input_size
            if size is not None and size != metadata.image_size:
                raise RunError(f"{folder.metadata_file}: field preprocessing.image_size: "
                               f"{metadata.image_size} is not the input size of the run's "
                               f"model ({size})")
        if not gate and folder.gate_file.is_file():
            log.warning("%s: no out-of-distribution gate (--no-gate): no film is flagged as "
                        "unlike a chest X-ray", folder.path)
        return cls(engine, metadata, folder.path, folder.gate() if gate else None, segmenter,
                   folder.sets(metadata))

    def with_test_time_views(self, views: int) -> "Predictor":
        """The same model scoring with ``views`` test-time views (its threshold was chosen with
        the run's own number: for measuring, not for use)."""
        return Predictor(self.engine, dataclasses.replace(self.metadata, test_time_views=views),
                         self.run_dir, self.gate, self.segmenter, self.conformal)

    @property
    def threshold(self) -> float:
        return self.metadata.threshold

    @property
    def image_size(self) -> int:
        return self.metadata.image_size

    @property
    def preprocessing(self) -> Preprocessing:
        """The run's (an ensemble's first member's; see ``input_preprocessing``)."""
        return self.metadata.preprocessing

    @property
    def input_preprocessing(self) -> Preprocessing | list[Preprocessing]:
        """What ``prepare`` applies: the run's, or each member's of an ensemble."""
        if isinstance(self.engine, EnsembleEngine):
            return [m.preprocessing for m in self.engine.members]
        return self.metadata.preprocessing

    @property
    def positive_class(self) -> str:
        return self.metadata.positive_class

    @property
    def test_time_views(self) -> int:
        return self.metadata.test_time_views

    def prepare(self, source, name: str | None = None,
                max_pixels: int | None = READ.max_pixels) -> Prepared:
        """``prepare_input`` with this run's preprocessing: the one path to its model."""
        return prepare_input(source, self.input_preprocessing, name, max_pixels, self.segmenter)

    def prepare_or_error(self, source, name: str | None = None,
                         max_pixels: int | None = READ.max_pixels) -> Prepared | Prediction:
        """``prepare``, or, for an input that cannot be read, its ``Prediction`` with
        ``error`` set (the file and the reason)."""
        try:
            return self.prepare(source, name, max_pixels)
        except ImageReadError as error:
            return Prediction(path=error.path, error=error.reason,
                              input_sha256=getattr(error, "sha256", None))

    def declared_pixels(self, data: bytes, name: str = "<bytes>") -> int:
        """The pixel count a file's header declares, every frame of a DICOM included, without
        decoding it (0: no readable header; reading the file will say why)."""
        return declared_pixels(name, data)

    def predict_prepared(self, images: np.ndarray, batch_size: int = 32,
                         test_time_views: int | None = None) -> np.ndarray:
        """The run's P(positive) for (n, size, size) uint8 model inputs (``test_time_views``:
        another number of views than the run's, e.g. 0 for the image alone)."""
        return self._final_scores(images, self.engine.forward(images, batch_size).scores,
                                  batch_size, test_time_views)

    def forward_prepared(self, images: np.ndarray, batch_size: int = 32):
        """One forward pass (plus the test-time views) of (n, size, size) uint8 model inputs:
        a ``Forward`` with the run's final P(positive) as ``scores`` and the Grad-CAM maps (at
        the last stage's resolution, in [0, 1]) as ``logit_maps``, beside the embeddings and a
        softmax head's class probabilities."""
        result = self.engine.forward(images, batch_size, maps=True)
        return dataclasses.replace(result, scores=self._final_scores(images, result.scores,
                                                                     batch_size),
                                   logit_maps=cams_from_logit_maps(result.logit_maps))

    def heatmaps_prepared(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Grad-CAM maps (n, h, w) in [0, 1] of model inputs, at the last stage's resolution."""
        return cams_from_logit_maps(self.engine.forward(images, batch_size, maps=True)
                                    .logit_maps)

    def _final_scores(self, images: np.ndarray, scores: np.ndarray, batch_size: int,
                      views: int | None = None) -> np.ndarray:
        """The run's score from the model's score of the images themselves: the mean over the
        test-time views, then the temperature (both as the threshold was chosen)."""
        from covidxray.run.calibration import apply_temperature
        from covidxray.pixels.transforms import mean_over_views
        views = self.test_time_views if views is None else views
        if views:
            scores = mean_over_views(lambda x: self.engine.scores(x, batch_size), images, views,
                                     first=scores)
        temperature = self.metadata.temperature
        return scores if not temperature else apply_temperature(scores, temperature).astype(
            np.float32)

    def predict_items(self, items: list[Prepared], heatmaps: bool = False,
                      batch_size: int = 32) -> list[Prediction]:
        """Predictions of prepared inputs, from one forward pass (plus one per test-time view,
        for the score only: the heat map and the gate see the image itself)."""
        if not items:
            return []
        images = np.stack([item.image for item in items])
        result = self.engine.forward(images, batch_size, maps=heatmaps)
        scores = self._final_scores(images, result.scores, batch_size)
        # the layout test looks at the (first member's) input
        verdicts = self.gate.check(result.embeddings, images if images.ndim == 3 else images[:, 0],
                                   [item.colourfulness for item in items],
                                   [item.lungs for item in items]) \
            if self.gate is not None else [None] * len(items)
        cams = cams_from_logit_maps(result.logit_maps) if heatmaps else [None] * len(items)
        sets = self.conformal.sets(scores) if self.conformal else [None] * len(items)
        spreads = result.spread if result.spread is not None else [None] * len(items)
        classes = result.probabilities if result.probabilities is not None \
            else [None] * len(items)
        predictions = []
        for item, score, verdict, cam, chosen, spread, each in zip(
                items, scores, verdicts, cams, sets, spreads, classes):
            flagged = verdict is not None and verdict.ood
            prediction = Prediction(
                path=item.name, probability=float(score),
                # a film unlike a frontal chest X-ray gets no call: its score stays, for research
                label=None if flagged else self.metadata.label_of(float(score)),
                positive=None if flagged else bool(score >= self.threshold),
                ood=None if verdict is None else verdict.ood,
                ood_reason=None if verdict is None else verdict.reason or None,
                feature_distance=None if verdict is None else verdict.embedding_distance,
                input_sha256=item.sha256, prediction_set=[] if flagged else chosen,
                member_spread=None if spread is None else float(spread),
                class_probabilities=None if each is None else {
                    name: float(p) for name, p in zip(self.metadata.output_classes, each)},
                verdict=NOT_FRONTAL if flagged else
                None if chosen is None else self.conformal.verdict(chosen),
                lungs_found=None if item.lungs is None else bool(item.lungs.plausible),
                lungs=item.lungs)
            if heatmaps:
                prediction.heatmap = uncrop(cam, item.gray.shape, item.box)
                prediction.image = item.gray
                if prediction.lungs_found:
                    prediction.lung_heat_share = heat_share(prediction.heatmap, item.lungs.mask)
            predictions.append(prediction)
        return predictions

    def prepare_many(self, sources, names=None, batch_size: int = 32, workers: int = 2,
                     max_pixels: int | None = READ.max_pixels):
        """Batches, in input order, of ``Prepared`` inputs and, for those that cannot be read,
        ``Prediction``s carrying the error; ``workers`` threads decode the next batch while the
        caller works on this one."""
        sources = list(sources)
        names = list(names) if names is not None else [None] * len(sources)

        def load(index):
            return self.prepare_or_error(sources[index], names[index], max_pixels)

        starts = range(0, len(sources), batch_size)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = [pool.map(load, range(start, min(start + batch_size, len(sources))))
                       for start in starts[:2]]
            for number in range(len(starts)):
                if number + 2 < len(starts):  # keep one batch decoding ahead
                    start = starts[number + 2]
                    pending.append(pool.map(load, range(start, min(start + batch_size,
                                                                   len(sources)))))
                yield list(pending[number])

    def predict_many(self, sources, names=None, heatmaps: bool = False, batch_size: int = 32,
                     workers: int = 2, max_pixels: int | None = READ.max_pixels,
                     progress_label: str | None = None) -> list[Prediction]:
        """Predict paths, bytes or arrays, in input order; one that cannot be read comes back
        with ``error`` set, and the others are still predicted. ``progress_label``: show a
        progress bar with that label."""
        sources = list(sources)
        results = []
        with progress(desc=progress_label, total=len(sources),
                      enabled=progress_label is not None) as bar:
            for batch in self.prepare_many(sources, names, batch_size, workers, max_pixels):
                predicted = iter(self.predict_items([x for x in batch if isinstance(x, Prepared)],
                                                    heatmaps, batch_size))
                results += [next(predicted) if isinstance(x, Prepared) else x for x in batch]
                bar.update(len(batch))
        return results

    def predict_paths(self, paths, batch_size: int = 32, workers: int = 2,
                      heatmaps: bool = False, progress_label: str | None = "predicting"
                      ) -> list[Prediction]:
        """Predict every file; unreadable ones come back with ``error`` set, in input order."""
        return self.predict_many([str(p) for p in paths], heatmaps=heatmaps,
                                 batch_size=batch_size, workers=workers,
                                 progress_label=progress_label)

    def predict(self, item, heatmap: bool = False):
        """P(COVID), label and verdict for a path, the bytes of a file, an array, or a list of
        them; ``heatmap`` adds the Grad-CAM on the input's own pixels."""
        if isinstance(item, (list, tuple)):
            return self.predict_many(item, heatmaps=heatmap)
        return self.predict_many([item], heatmaps=heatmap)[0]


def input_preprocessing_of(folder: Path) -> Preprocessing | list[Preprocessing]:
    """``Predictor.input_preprocessing`` of a run or ensemble folder, read from its metadata
    without loading a model."""
    run = RunFolder(folder)
    metadata = run.metadata()
    if not metadata.members:
        return metadata.preprocessing
    return [member.metadata().preprocessing for member in run.member_folders(metadata)]


def load_segmenter(folder: Path):
    """The lung segmenter of a run or exported folder (``lungs/``, copied there by training or
    export; exported: ``lungs/lungs.onnx``), else the one shipped with the package (None, with
    a warning, where it is not installed)."""
    from covidxray.model.lungs import CARD_NAME, LungCard, LungSegmenter, default_segmenter
    run = RunFolder(folder)
    own = run.lungs_folder
    if run.lungs_onnx_file.is_file():
        return LungSegmenter.from_onnx(run.lungs_onnx_file, LungCard.load(own / CARD_NAME))
    if own.is_dir():
        return LungSegmenter.load(own)
    return default_segmenter()


def format_predictions(predictions: list[Prediction], metadata: RunMetadata) -> str:
    """A table for the terminal, under the research-use notice."""
    lines = [metadata.notice]
    if metadata.synthetic_data:
        lines.append("*** model trained on SYNTHETIC data: outputs mean nothing clinically ***")
    width = max([len(p.path) for p in predictions] + [4])
    sets = any(p.verdict for p in predictions)
    lines.append(f"{'file':<{width}}  P(COVID)  {'label':<12}"
                 + (f"  {'verdict (set)':<28}" if sets else "")
                 + f"  (threshold {metadata.threshold:.4f})")
    for p in predictions:
        if p.error:
            lines.append(f"{p.path:<{width}}  {'-':>8}  ERROR: {p.error}")
            continue
        if p.ood:  # no call: the score is for research, in brackets
            lines.append(f"{p.path:<{width}}  {f'({p.probability:.4f})':>8}  "
                         f"{NOT_FRONTAL.upper()}: {p.ood_reason}")
            continue
        verdict = f"  {p.verdict.upper() if p.verdict == UNCERTAIN else p.verdict:<28}" \
            if sets else ""
        classes = "  " + " ".join(f"{name} {value:.3f}" for name, value in
                                  p.class_probabilities.items()) if p.class_probabilities else ""
        lines.append(f"{p.path:<{width}}  {p.probability:8.4f}  {p.label:<12}{verdict}{classes}")
    if sets:
        lines.append(f"Verdict: the conformal prediction set at {metadata.confidence:.0%} "
                     f"confidence. UNCERTAIN: REFER means the model cannot tell at that "
                     f"confidence; 'unlike the calibration data' that the film is like neither "
                     f"class it was calibrated on. The error rate holds only for films like the "
                     f"validation films.")
    if any(p.ood for p in predictions):
        lines.append("Images unlike a frontal chest X-ray get no verdict: the score in brackets "
                     "means nothing.")
    return "\n".join(lines)
