import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")
# what covidxray derives once (ready models built, exports for onnxruntime) goes to a folder of
# this test session's, never the user's own cache
os.environ["COVIDXRAY_CACHE"] = tempfile.mkdtemp(prefix="covidxray-test-cache-")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CXR_DEV = SHARED_DATA / "cxr-dev"
DICOM_DIR = SHARED_DATA / "dicom"

# the smallest training that still exercises both phases of the real code path; ResNet50, the
# reference design, has its own end-to-end test (test_cli.test_train_evaluate_predict)
TINY_TRAIN = dict(image_size=64, backbone="mobilenetv3small", weights="none", head_epochs=1,
                  finetune_epochs=1, unfreeze_stages=1, batch_size=8, patience=1)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    from covidxray.data.synthetic import make_synthetic_dataset
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "tiny", n_per_class=14,
                                  size=96, seed=1)


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    """One small trained run shared by the tests that only read it (a test that writes into
    a run takes ``own_run``); the session fails if any test changed it."""
    import covidxray
    run = covidxray.train(tiny_data, tmp_path_factory.mktemp("runs") / "tiny", verbose=0,
                          **TINY_TRAIN)
    before = _listing(run)
    yield run
    assert _listing(run) == before, "a test wrote into the shared tiny_run"


@pytest.fixture
def own_run(tiny_run, tmp_path) -> Path:
    """A copy of ``tiny_run`` that the test may write into."""
    import shutil
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


class FixedLungs:
    """A stand-in lung segmenter that finds the same lungs on every image: ``boxes`` of
    (top, bottom, left, right) fractions of the image (``plausible``: as judged)."""

    def __init__(self, boxes, plausible: bool = True, size: int = 64):
        from covidxray.model.lungs import LungCard
        self.mask = np.zeros((size, size), bool)
        for top, bottom, left, right in boxes:
            self.mask[round(top * size):round(bottom * size),
                      round(left * size):round(right * size)] = True
        self.plausible = plausible
        self.card = LungCard("fixed", size, 0, 0, sha256="0" * 64)

    def field(self, gray):
        from covidxray.pixels.lungfield import LungField
        return LungField(self.mask, float(self.mask.mean()), self.plausible,
                         "" if self.plausible else "lungs found on one side only (test)")

    def fields(self, grays):
        return [self.field(g) for g in grays]


def predictor_of(model, image_size: int, threshold: float = 0.5, crop: float | str = 0.0,
                 segmenter=None):
    """A ``Predictor`` around a bare classifier (layers ``pool`` and ``p_covid``), for tests
    of what uses one; ``segmenter``: e.g. ``FixedLungs``."""
    from covidxray.config import Preprocessing
    from covidxray.run.metadata import RunMetadata
    from covidxray.run.predictor import Predictor
    metadata = RunMetadata(class_names=["COVID", "NORMAL"], positive_class="COVID",
                           preprocessing=Preprocessing(image_size, crop=crop),
                           backbone="test", weights="none", threshold=threshold,
                           threshold_method="youden", model_id="test", data_fingerprint="",
                           created="", covidxray_version="", backend="")
    return Predictor(model, metadata, segmenter=segmenter)


@pytest.fixture
def readonly_folder(tmp_path):
    """A folder nobody can write into, root included: a read-only tmpfs where this runs as
    root (permission bits do not stop root), else a folder without write permission."""
    import subprocess
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only folder here ({mounted.stderr.decode().strip()})")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
