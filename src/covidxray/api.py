"""The Python API; the command line is argument parsing over these functions.

Importing this module is cheap: each function imports the heavy parts (Keras and its backend)
only when it is called.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

# what the command line builds its options from: typed defaults and names, no heavy import
from covidxray.config import AUDIT_FINDINGS, DEFAULT_TARGET_SENSITIVITY, DEMO, DICOM_NODE, \
    DOWNLOAD_FOLDER, EVALUATION, EXPORT_FORMATS, FILL_MODES, INTENSITY_MODES, KAGGLE_DATASET, \
    LUNG_CROP, LUNG_TRAINING, PREDICT, RECIPES, RESEARCH_NOTICE, RUNTIMES, SCHEDULES, SERVE, \
    AugmentConfig, TrainConfig  # noqa: F401
from covidxray.errors import UserError, require  # noqa: F401  (UserError: the CLI's)
from covidxray.fileutil import write_json_atomic
from covidxray.model.backbones import BACKBONES  # noqa: F401
from covidxray.model.weights import DEFAULT_READY_MODEL, READY_MODELS
READY_MODEL_NAMES = tuple(READY_MODELS)

log = logging.getLogger("covidxray")


def run_folder(run: str | Path) -> Path:
    """A run folder as given, or the folder of a ready model named ``run`` (``models()``),
    built once into the cache."""
    from covidxray.run.ready import resolve_run
    return resolve_run(run)


def looks_like_run(path: str | Path) -> bool:
    """A folder that holds (part of) a run, an exported model or an ensemble, rather than
    images: its metadata, a model, a training's config or members."""
    from covidxray.run.folder import RunFolder
    folder = RunFolder(path)
    return folder.path.is_dir() and any(file.exists() for file in (
        folder.metadata_file, folder.keras_file, folder.onnx_file, folder.config_file,
        folder.members_folder))


def models() -> list[dict]:
    """The ready models shipped with covidxray: name, summary, and whether their files are
    intact (``model_card(name)`` gives the whole card)."""
    from covidxray.model.weights import ReadyModelError
    listed = []
    for name, spec in READY_MODELS.items():
        try:
            card, problem = spec.card(), None
        except ReadyModelError as error:
            card, problem = None, str(error)
        listed.append({"name": name, "summary": spec.summary, "default":
                       name == DEFAULT_READY_MODEL, "card": card, "problem": problem})
    return listed


def model_card(name: str) -> dict:
    """The model card of a ready model (its files checked against their sha256)."""
    from covidxray.model.weights import ready_model
    return ready_model(name).card()


def metadata(run: str | Path):
    """A run's ``RunMetadata``, read without loading its model."""
    from covidxray.run.folder import RunFolder
    return RunFolder(run_folder(run)).metadata()


def train(data: str | Path, out: str | Path, resume: bool = False, verbose: int | str = "auto",
          track: str | None = None, tensorboard: str | Path | None = None, ensemble: int = 0,
          **options) -> Path:
    """Train on ``data`` and write the run folder ``out``; ``options`` are ``TrainConfig``
    fields. With ``resume``, an interrupted run in ``out`` continues with its own settings.
    ``ensemble=K``: K seeds on one split, written as one ensemble run (``ensemble``).

    ``track="mlflow"`` (or ``"mlflow=URI"``) records the run in MLflow: config, every epoch,
    then the test split's metrics, the model card, the report and the run folder.
    ``tensorboard``: a folder for every epoch's metrics as TensorBoard scalars.

    >>> covidxray.train("data/", "runs/r1", backbone="efficientnet-lite0")  # doctest: +SKIP
    """
    from covidxray.training.ensemble import train_ensemble
    from covidxray.training.fit import train as train_run
    from covidxray.training.tracking import MlflowTracker, parse_track, tensorboard_callback
    from covidxray.run.folder import RunFolder
    folder = RunFolder(out)
    members_file = folder.ensemble_plan_file  # an ensemble being trained: how many members
    if resume:
        config = folder.read_config()
        if members_file.is_file():
            ensemble = json.loads(members_file.read_text())["members"]
    else:
        config = TrainConfig(data=[str(d) for d in data] if isinstance(data, (list, tuple))
                             else str(data), out=str(out), **options)
        if ensemble:
            if folder.config_file.exists():
                raise UserError(f"{out} already holds a run: use --resume, or another "
                                      f"--out")
            config.save(folder.config_file)
            write_json_atomic(members_file, {"members": ensemble})
    tracker = (MlflowTracker(parse_track(track), config.to_dict(), Path(out).name)
               if track else None)
    callbacks = ([tracker.callback()] if tracker else []) + (
        [tensorboard_callback(tensorboard)] if tensorboard else [])
    try:
        run = train_ensemble(config, ensemble, resume, verbose, tuple(callbacks)) if ensemble \
            else train_run(config, resume=resume, verbose=verbose, callbacks=tuple(callbacks))
    except BaseException:
        if tracker:
            tracker.fail()
        raise
    if tracker:
        predictor, metrics, written = _evaluate_and_report(run, RunFolder(run).report_file)
        tracker.finish(run, metadata=predictor.metadata.public_dict(),
                       test_metrics={name: m["value"] for name, m in
                                     metrics.overall["metrics"].items()},
                       report=written)
    return run


def _evaluate_and_report(run: Path, report_file: Path, bootstrap: int = EVALUATION.bootstrap,
                         seed: int = 0):
    """The run's test metrics and its HTML report, from one loaded model: the ``Predictor``,
    the metrics and the report's path."""
    from covidxray.evaluation.evaluate import evaluate as evaluate_run
    from covidxray.evaluation.report import build_report
    predictor = load(run)
    metrics = evaluate_run(run, n_bootstrap=bootstrap, seed=seed, predictor=predictor,
                           shortcut_images=EVALUATION.shortcut_images)
    return predictor, metrics, build_report(run, report_file, predictor=predictor,
                                            metrics=metrics)


def ensemble(runs, out: str | Path, confidence: float | None = None,
             calibrate: bool = False) -> Path:
    """One run of several trained runs (copied into ``out/members/``): P(COVID) is their
    mean, their spread is kept per image, the threshold, gate and prediction sets are chosen
    again on the validation films they share. Every command takes it as a run."""
    from covidxray.training.ensemble import build_ensemble
    return build_ensemble([run_folder(r) for r in runs], out, confidence=confidence,
                          calibrate=calibrate)


def train_lungs(folders, out: str | Path, verbose: int | str = "auto", **options) -> dict:
    """Train a lung segmenter on folders of image/mask pairs (split by patient) and write its
    weights and model card into ``out``; ``options`` are ``config.LungTrainConfig`` fields
    (image_size, epochs, seed, licence...). Returns the card (held-out Dice per folder)."""
    import dataclasses

    from covidxray.training.lungs import train_segmenter
    config = dataclasses.replace(LUNG_TRAINING, **options)
    return train_segmenter(folders, out, config, verbose=verbose).to_dict()


def load(run: str | Path = DEFAULT_READY_MODEL, gate: bool = True,
         runtime: str = PREDICT.runtime):
    """Load a run folder, or a ready model by name (default: the one ``covidxray predict``
    uses when given no run), into a ``Predictor``; ``.predict(path, bytes or array)`` gives a
    ``Prediction`` (P(COVID), label, verdict; ``heatmap=True`` adds the Grad-CAM on the
    input's own pixels). ``gate=False``: no out-of-distribution gate (a gate file that cannot
    be read otherwise stops the load). ``runtime``: "onnx" (the run's classifier exported once
    for onnxruntime, no Keras imported) or "keras"."""
    from covidxray.run.predictor import Predictor
    return Predictor.load(run_folder(run), gate=gate, runtime=runtime)


def predict(run: str | Path, paths, batch_size: int = PREDICT.batch_size,
            heatmaps: str | Path | None = None, alpha: float = EVALUATION.heatmap_alpha,
            gate: bool = True, runtime: str = PREDICT.runtime) -> list:
    """Predict files and folders (recursive) with a run (or an exported model); an unreadable
    file comes back with ``error`` set. ``heatmaps``: a folder for Grad-CAM overlays
    (``<name>_gradcam.png``). For an archive, ``score`` writes results as it goes instead."""
    from covidxray.run.inputs import collect_paths
    from covidxray.run.predictor import Predictor
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = collect_paths(paths)
    if not paths:
        return []
    predictor = Predictor.load(run_folder(run), gate=gate, runtime=runtime)
    results = predictor.predict_paths(paths, batch_size=batch_size,
                                      heatmaps=heatmaps is not None)
    if heatmaps is not None:
        _write_overlays(results, heatmaps, alpha)
    return results


def score(run: str | Path, sources, out: str | Path, engine: str = "local",
          address: str | None = None, workers: int = PREDICT.ray_workers,
          batch_size: int = PREDICT.batch_size, quiet: bool = False,
          chunk: int = PREDICT.chunk, gate: bool = True,
          retry_errors: bool = PREDICT.retry_errors, runtime: str = PREDICT.runtime) -> dict:
    """Score every file of ``sources`` (folders, CSV lists of paths, files) into ``out`` (a
    .csv file or a .parquet folder), ``chunk`` rows at a time as it goes; run again, it skips
    the files already there. ``engine``: "local" (this process) or "ray" (Ray Data: this
    machine, or the cluster at ``address``; ``workers`` actors each load the model once)."""
    from covidxray.deploy.batch import check_writable, score as score_archive
    check_writable(out)  # before a ready model is built for nothing
    return score_archive(run_folder(run), sources, out, engine, address, workers, batch_size,
                         quiet, chunk, gate=gate, retry_errors=retry_errors, runtime=runtime)


def _write_overlays(predictions, folder: str | Path, alpha: float) -> None:
    from covidxray.evaluation.explain import explanation_of, save_png
    for prediction in predictions:
        if not prediction.error:
            save_png(Path(folder) / f"{Path(prediction.path).stem}_gradcam.png",
                     explanation_of(prediction, alpha).overlay)


def evaluate(run: str | Path, data: str | Path | None = None,
             bootstrap: int = EVALUATION.bootstrap,
             shortcut_images: int = EVALUATION.shortcut_images, source_from_prefix: bool = False,
             out: str | Path | None = None, seed: int = 0, strict: bool = False,
             gate: bool = True, runtime: str = PREDICT.runtime):
    """Metrics of a run at its frozen threshold on ``data`` (default: its own test split), with
    ``bootstrap`` resamples for the 95% intervals and the shortcut check on
    ``shortcut_images`` images; written to ``out`` (default: the run's metrics file)."""
    from covidxray.evaluation.evaluate import evaluate as evaluate_run
    run = run_folder(run)
    return evaluate_run(run, data, n_bootstrap=bootstrap, predictor=load(run, gate, runtime),
                        source_from_prefix=source_from_prefix,
                        out=out, seed=seed, strict=strict, shortcut_images=shortcut_images)


def explain(run: str | Path, source, alpha: float = EVALUATION.heatmap_alpha,
            gate: bool = True, runtime: str = PREDICT.runtime):
    """Grad-CAM of one image (a path, bytes or an array): an ``Explanation`` with
    ``.heatmap`` ([0, 1], on the image's own pixels), ``.overlay`` (RGB), ``.probability`` and
    ``.label``. Raises ``ImageReadError`` for an unreadable image."""
    from covidxray.evaluation.explain import explain_image
    return explain_image(load(run, gate, runtime), source, alpha)


def explain_files(run: str | Path, paths, out: str | Path,
                  alpha: float = EVALUATION.heatmap_alpha, gate: bool = True,
                  runtime: str = PREDICT.runtime) -> list:
    """Grad-CAM overlays of files and folders written into ``out`` as
    ``<name>_gradcam.png``; returns the predictions (unreadable files carry ``error``)."""
    from covidxray.run.inputs import collect_paths
    results = load(run, gate, runtime).predict_paths(collect_paths(paths), heatmaps=True,
                                      progress_label="explaining")
    _write_overlays(results, out, alpha)
    return results


def download(handle: str | None = None, out: str | Path = DOWNLOAD_FOLDER) -> dict:
    """Fetch a Kaggle data set (default: the reference design's) through kagglehub into
    ``out/<name>`` with a checksum record; returns the record, with ``root``: the folder to
    give to ``train`` and ``audit``."""
    from covidxray.data.download import download as fetch
    return fetch(handle or KAGGLE_DATASET, out)


def audit(data, out: str | Path | None = None, split_file: str | Path | None = None,
          near_distance: int | None = EVALUATION.near_distance,
          positive_class: str | None = None, source_from_prefix: bool = False,
          image_statistics: bool = True, strict: bool = False,
          same_patients: tuple[str, ...] = ()):
    """Audit a data set or several together (``split_file``: with the splits of a run's
    ``split.csv``; ``same_patients``: as ``TrainConfig.same_patients``): an
    ``AuditResult``; ``out``: also write it as JSON. ``near_distance=None`` skips the
    near-duplicate search; ``image_statistics=False`` skips measuring how well image
    statistics alone separate each source's classes (and which pixel options lower it);
    ``strict``: a manifest's repeated, conflicting, empty or differently spelt labels are an
    error, not a warning."""
    from covidxray.data.audit import audit as audit_records
    from covidxray.data.dataset import discover, with_splits
    from covidxray.data.split import read_split_csv
    from covidxray.fileutil import write_json_atomic
    from covidxray.model.lungs import default_segmenter
    from covidxray.config import parse_same_patients
    records = discover(data, positive_class, source_from_prefix, strict,
                       parse_same_patients(same_patients)).records
    if split_file:
        records = with_splits(records, read_split_csv(split_file))
    result = audit_records(records, near_distance, image_statistics,
                           default_segmenter() if image_statistics else None)
    if out is not None:
        write_json_atomic(out, {"data": [str(d) for d in data] if isinstance(data, list)
                                else str(data), **result.to_dict()})
    return result


def audit_failures(result, fail_on) -> list[str]:
    """The findings among ``fail_on`` (of ``AUDIT_FINDINGS``) that an audit made."""
    from covidxray.data.audit import failures
    return failures(result, fail_on)


def report(run: str | Path, out: str | Path = EVALUATION.report_file,
           audit: bool = True) -> Path:
    """One self-contained HTML report of a run (with the audit of its split unless
    ``audit=False``)."""
    from covidxray.evaluation.report import build_report
    return build_report(run_folder(run), out, audit=audit)


def crossval(data: str | Path, out: str | Path, by: str = "source", random_split: bool = True,
             bootstrap: int = EVALUATION.crossval_bootstrap, baseline_only: bool = False,
             resume: bool = False, **options) -> dict:
    """Leave-one-source-out: a model per held-out source (and a random split beside them),
    each with the thumbnail baseline on the same folds; ``options`` are ``TrainConfig`` fields.
    Written to ``out/crossval.json`` and ``crossval.csv``."""
    from covidxray.evaluation.crossval import crossval as run_crossval
    config = TrainConfig(data=[str(d) for d in data] if isinstance(data, (list, tuple))
                         else str(data), out=str(out), **options)
    return run_crossval(config.data, out, config, by=by, random_split=random_split,
                        n_bootstrap=bootstrap, train_models=not baseline_only, resume=resume)


def serve(run: str | Path, **settings) -> None:
    """Serve the web page and REST API of a run until interrupted; ``settings`` are
    ``ServeConfig`` fields (host, port, limits, API keys, audit database, workers)."""
    import dataclasses
    import json
    import os
    import tempfile

    uvicorn = require("uvicorn", "serving", "serve")

    from covidxray.config import ServeConfig
    from covidxray.deploy.serve.app import SETTINGS_ENV, app_from_environment, create_app
    config = ServeConfig(**settings)
    run = run_folder(run)
    load(run, config.gate, config.runtime)  # a bad run fails here, before any worker starts
    if config.workers == 1:
        uvicorn.run(create_app(run, settings=config), host=config.host, port=config.port,
                    log_level="info")
        return
    os.environ[SETTINGS_ENV] = json.dumps({"run": str(run), **dataclasses.asdict(config)})
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="covidxray-"))
    uvicorn.run(f"{app_from_environment.__module__}:{app_from_environment.__name__}",
                factory=True, workers=config.workers, host=config.host, port=config.port,
                log_level="info")


def dicom_node(run: str | Path, block: bool = True, **settings):
    """Start the DICOM node of a run (``settings``: ``DicomNodeConfig`` fields): C-ECHO and
    C-STORE of chest films; each is scored and answered with a Structured Report and a heat-map
    Secondary Capture, written to ``out`` and/or sent to ``send_to``. With ``block``, serve
    until interrupted; else return the running node (``.port``, ``.stop()``)."""
    require("pynetdicom", "the DICOM node", "dicom")
    require("highdicom", "the DICOM node", "dicom")
    from covidxray.deploy.dicom.node import start_node
    from covidxray.config import DicomNodeConfig
    return start_node(run_folder(run), DicomNodeConfig(**settings), block=block)


def dicom_node_status(run: str | Path, outbox: str | Path | None = None) -> dict:
    """What waits in a DICOM node's outbox for the PACS (``outbox``: the node's ``--outbox``;
    default: the run's), read from the folder: the node need not be running."""
    from covidxray.deploy.dicom.outbox import status_of
    from covidxray.run.folder import RunFolder
    return status_of(outbox or RunFolder(run_folder(run)).outbox_folder)


def export(run: str | Path, out: str | Path, format: str = EXPORT_FORMATS[0],
           force: bool = False) -> dict:
    """The run as a model that runs with onnxruntime alone, in the folder ``out`` (the model,
    its metadata and gate); ``predict``, ``load`` and ``serve`` take that folder as a run.
    ``out`` must be new, empty or an earlier export of the same run (``force``: replace
    whatever it holds). Returns what ``out/export.json`` records (the parity with the run and
    model.onnx's sha256 included)."""
    from covidxray.deploy.export import export as export_run
    return export_run(run_folder(run), out, format, force)


def new_api_key(keys_file: str | Path, key_id: str) -> str:
    """A new API key for ``serve --api-keys``: its hash is added to ``keys_file`` under
    ``key_id``; the key itself is returned, once."""
    from covidxray.deploy.serve.security import new_api_key as make
    return make(keys_file, key_id)


def demo(out: str | Path = DEMO.out, data: str | Path | None = None,
         image_size: int = DEMO.image_size, epochs: int = DEMO.epochs,
         n_per_class: int = DEMO.n_per_class, seed: int = DEMO.seed,
         verbose: int | str = "auto") -> dict:
    """The whole pipeline on ``data`` (default: synthetic images made now) under ``out``:
    train (the offline pretrained backbone when its weights are installed, else ResNet50 from
    random weights), evaluate on the test split, predict a few test images, write the HTML
    report. Returns what it made: ``data``, ``run``, ``metrics``, ``predictions``, ``report``."""
    from covidxray.data.synthetic import make_synthetic_dataset
    from covidxray.model.backbones import get_backbone
    from covidxray.model.weights import OFFLINE_BACKBONE, offline_weights
    from covidxray.run.folder import RunFolder
    out = Path(out)
    if RunFolder(out / "run").config_file.exists():
        raise UserError(f"{out} already holds a demo; remove it or choose another folder")
    data = Path(data) if data else make_synthetic_dataset(
        out / "data", n_per_class=n_per_class, size=2 * image_size, seed=seed)
    pretrained = offline_weights(get_backbone(OFFLINE_BACKBONE))
    recipe = (dict(backbone=OFFLINE_BACKBONE, weights="imagenet", head_epochs=epochs,
                   finetune_epochs=0) if pretrained else
              dict(weights="none", finetune_epochs=epochs))
    log.info("demo: training %s on %s", f"{OFFLINE_BACKBONE} (ImageNet weights, offline)"
             if pretrained else "ResNet50 from random weights", data)
    run = train(data, out / "run", verbose=verbose, image_size=image_size, batch_size=16,
                patience=epochs, seed=seed, **recipe)
    predictor, metrics, written = _evaluate_and_report(
        run, out / EVALUATION.report_file, bootstrap=EVALUATION.crossval_bootstrap,
        seed=seed)
    test = [r.path for r in RunFolder(run).read_split(predictor.positive_class)
            if r.split == "test"][:6]
    return {"data": data, "run": run, "metrics": metrics, "predictor": predictor,
            "predictions": predictor.predict_paths(test), "report": written}


# what the command line prints, importable without the heavy parts


def format_evaluation(result: dict) -> str:
    from covidxray.evaluation.text import format_report
    return format_report(result)


def format_audit(result) -> str:
    from covidxray.data.audit import format_audit as audit_text
    return audit_text(result)


def format_crossval(result: dict) -> str:
    from covidxray.evaluation.crossval import format_crossval as crossval_text
    return crossval_text(result)


def format_predictions(predictions: list, metadata) -> str:
    from covidxray.run.predictor import format_predictions as predictions_text
    return predictions_text(predictions, metadata)


def format_card(card: dict) -> str:
    from covidxray.run.ready import format_card as card_text
    return card_text(card)
