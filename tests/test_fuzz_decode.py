"""Property-based fuzzing of the reader boundary: whatever bytes a file holds (real PNG, JPEG
and DICOM files with mutated headers and data), reading it gives a valid image or an
``ImageReadError`` naming it, and nothing else."""

import io
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CXR_DEV, DICOM_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from covidxray.pixels.decode import ImageReadError, decode
from test_decode import gradient, write_dicom

EXAMPLES = 500  # per format
# mutated headers make pydicom warn about each invalid value it still reads
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def real_png() -> bytes:
    """A real chest X-ray where the shared data is present, a drawn film otherwise."""
    files = sorted(CXR_DEV.glob("raddb/*.png")) or sorted(CXR_DEV.glob("*/*.png"))
    if files:
        with Image.open(files[0]) as image:
            image = image.convert("L").resize((64, 64))
    else:
        from covidxray.data.synthetic import synthetic_radiograph
        image = Image.fromarray((synthetic_radiograph(np.random.default_rng(0), 64) * 255)
                                .astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def real_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(real_png())).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def dicoms() -> list[bytes]:
    """Two written here (windowed; deflated) and, where present, the real JPEG-compressed
    film."""
    with tempfile.TemporaryDirectory() as folder:
        files = [write_dicom(Path(folder) / "window.dcm", np.rint(gradient(32, 32) * 1000),
                             window=(400.0, 800.0)).read_bytes(),
                 write_dicom(Path(folder) / "deflated.dcm", np.rint(gradient(32, 32) * 4000),
                             deflated=True).read_bytes()]
    if DICOM_DIR.exists():
        files.append((DICOM_DIR / "cxr_pa_jpeg_baseline.dcm").read_bytes())
    return files


@st.composite
def mutated(draw, originals: list[bytes]):
    """One of the files with a few bytes changed (the header more often), cut short, or with
    bytes inserted."""
    data = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["header", "anywhere", "truncate", "insert"]))
        if kind == "truncate":
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "insert":
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif data:
            end = min(len(data), 1024) if kind == "header" else len(data)
            data[draw(st.integers(0, end - 1))] = draw(st.integers(0, 255))
        if not data:
            break
    return bytes(data)


def check(data: bytes, name: str) -> None:
    try:
        decoded = decode(name, data, max_pixels=4_000_000)
    except ImageReadError as error:
        assert error.path == name and error.reason
        return
    gray = decoded.gray
    assert gray.ndim == 2 and gray.dtype == np.float32 and np.all(np.isfinite(gray))
    assert gray.min() >= 0 and gray.max() <= 1 and 0 <= decoded.colourfulness <= 1


FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=mutated([real_png()]))
def test_mutated_png(data):
    check(data, "fuzz.png")


@FUZZ
@given(data=mutated([real_jpeg()]))
def test_mutated_jpeg(data):
    check(data, "fuzz.jpg")


@FUZZ
@given(data=mutated(dicoms()))
def test_mutated_dicom(data):
    check(data, "fuzz.dcm")
