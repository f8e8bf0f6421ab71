import io

import numpy as np
import pytest
from conftest import DICOM_DIR
from PIL import Image

from covidxray.pixels.imageio import ImageReadError, decode, load_for_model, prepare, read_image


def gradient(height=40, width=30):
    return np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))


def write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0,
                window=None, bits=16):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "test-patient"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_png_8bit_scaled_to_unit_range(tmp_path):
    pixels = (gradient() * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.float32 and out.shape == (40, 30)
    np.testing.assert_allclose(out, pixels / 255.0, atol=1e-6)


@pytest.mark.parametrize("bits", [12, 16])
def test_png_16bit_scaled_by_its_bit_depth(tmp_path, bits):
    pixels = np.rint(gradient() * (2**bits - 1)).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").mode.startswith("I")
    out = read_image(tmp_path / "a.png")
    assert out.max() == pytest.approx(1.0) and out.min() == 0.0
    np.testing.assert_allclose(out, gradient(), atol=1.0 / 2**bits)


def test_tiff_16bit(tmp_path):
    pixels = np.rint(gradient() * 65535).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a.tif")
    np.testing.assert_allclose(read_image(tmp_path / "a.tif"), gradient(), atol=1e-4)


def test_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :10, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[:, :10] == pytest.approx(200 / 255, abs=1e-2)
    assert np.all(out[:, 10:] == 0)


def test_palette_and_rgb_and_bmp_and_jpeg(tmp_path):
    gray = (gradient() * 255).astype(np.uint8)
    rgb = Image.fromarray(np.stack([gray] * 3, -1))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(tmp_path / "p.png")
    rgb.save(tmp_path / "a.bmp")
    rgb.save(tmp_path / "a.jpg", quality=95)
    for name in ("p.png", "a.bmp", "a.jpg"):
        np.testing.assert_allclose(read_image(tmp_path / name), gray / 255.0, atol=0.06)
        assert decode(tmp_path / name).colourfulness < 0.01  # gray stored as RGB: no colour


def test_colourfulness_survives_the_conversion_to_gray(tmp_path):
    rgb = np.zeros((30, 30, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 220, 40, 60  # red everywhere: chroma 180 / 255
    Image.fromarray(rgb).save(tmp_path / "red.png")
    decoded = decode(tmp_path / "red.png")
    assert decoded.colourfulness == pytest.approx(180 / 255, abs=1e-3)
    assert decoded.gray.ndim == 2
    np.testing.assert_array_equal(decoded.gray, read_image(tmp_path / "red.png"))


def test_truncated_jpeg_is_reported(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(
        buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated") as info:
        read_image(tmp_path / "cut.jpg")
    assert info.value.path.endswith("cut.jpg")


def test_text_file_named_png_is_reported(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(ImageReadError, match="not a recognised image"):
        read_image(tmp_path / "notes.png")


def test_empty_file_is_reported(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(tmp_path / "empty.png")


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ImageReadError, match="cannot read"):
        read_image(tmp_path / "nope.png")


def test_dicom_rescale_and_window(tmp_path):
    raw = np.rint(gradient() * 1000).astype(np.uint16)
    # stored = (value - intercept) / slope; window keeps the values 0..500 of 0..1000
    path = write_dicom(tmp_path / "a.dcm", raw, slope=2.0, intercept=-1000.0,
                       window=(-500.0, 1000.0))
    out = read_image(path)
    values = raw * 2.0 - 1000.0  # -1000 .. 1000; window centre -500 width 1000: -1000..0
    expected = np.clip((values + 1000) / 1000, 0, 1)
    np.testing.assert_allclose(out, expected, atol=0.01)


def test_dicom_monochrome1_is_inverted(tmp_path):
    raw = np.rint(gradient() * 4095).astype(np.uint16)
    mono2 = read_image(write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2"))
    mono1 = read_image(write_dicom(tmp_path / "m1", raw, "MONOCHROME1"))  # no suffix: by content
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono1[:, 0].mean() > mono1[:, -1].mean()


def test_corrupt_dicom_is_reported(tmp_path):
    data = bytearray(write_dicom(tmp_path / "a.dcm", np.zeros((20, 20), np.uint16)).read_bytes())
    (tmp_path / "bad.dcm").write_bytes(bytes(data[:-300]))
    with pytest.raises(ImageReadError, match="DICOM"):
        read_image(tmp_path / "bad.dcm")


@pytest.mark.skipif(not DICOM_DIR.exists(), reason="shared DICOM samples not present")
def test_real_jpeg_dicoms():
    baseline = read_image(DICOM_DIR / "cxr_pa_jpeg_baseline.dcm")
    mono1 = read_image(DICOM_DIR / "cxr_pa_monochrome1.dcm")
    assert baseline.shape == (1024, 1024)
    np.testing.assert_allclose(mono1, 1.0 - baseline, atol=1e-6)
    # a frontal chest film: the mediastinum (centre column) is brighter than the lung fields
    centre = baseline[300:700, 480:545].mean()
    lungs = np.concatenate([baseline[300:700, 200:350], baseline[300:700, 680:830]]).mean()
    assert centre > lungs


def test_prepare_is_the_one_path(tmp_path):
    pixels = (gradient(80, 60) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    out = load_for_model(tmp_path / "a.png", 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, prepare(read_image(tmp_path / "a.png"), 32))
    assert out[:, 0].mean() < 20 and out[:, -1].mean() > 235
