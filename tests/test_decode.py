"""Decoding (``pixels.decode``): every format and DICOM syntax to one gray array, and every
file it cannot read refused by name and reason, within the pixel budgets."""

import io
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from conftest import DICOM_DIR
from PIL import Image

from covidxray.pixels.decode import ImageReadError, decode, read_image


def gradient(height=40, width=30):
    return np.tile(np.linspace(0, 1, width, dtype=np.float32), (height, 1))


def write_dicom(path, pixels, photometric="MONOCHROME2", slope=1.0, intercept=0.0,
                window=None, bits=16, deflated=False, pixel_data=None, **elements):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, \
        SecondaryCaptureImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflated else ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "test-patient"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    for name, value in elements.items():
        setattr(ds, name, value)
    ds.PixelData = pixel_data if pixel_data is not None else \
        pixels.astype(np.uint16 if bits == 16 else np.uint8).tobytes()
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


def test_a_deflated_dicom_is_read(tmp_path):
    raw = np.rint(gradient() * 4095).astype(np.uint16)
    plain = read_image(write_dicom(tmp_path / "p.dcm", raw))
    np.testing.assert_array_equal(read_image(write_dicom(tmp_path / "d.dcm", raw,
                                                         deflated=True)), plain)


def test_a_deflate_bomb_is_refused_before_it_inflates(tmp_path):
    """A few hundred KB that inflate to 200 MB, behind a header that declares 64 x 64 pixels:
    refused having inflated no more than the header promises."""
    import tracemalloc
    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((64, 64), np.uint16), deflated=True,
                       pixel_data=bytes(200_000_000))
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="inflates beyond the 8192 bytes its header"):
        read_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000


def test_an_oversized_declaration_is_refused_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((64, 64), np.uint16), deflated=True,
                       Rows=30000, Columns=30000)
    with pytest.raises(ImageReadError, match="over the limit"):
        read_image(path, max_pixels=60_000_000)


@pytest.mark.parametrize("elements,reason", [
    ({"WindowCenter": 500.0, "WindowWidth": 0.0}, "window width"),
    ({"WindowCenter": 500.0, "WindowWidth": -10.0}, "window width"),
    ({"WindowCenter": 500.0, "WindowWidth": 0.0, "VOILUTFunction": "SIGMOID"}, "window width"),
    ({"WindowCenter": 12345.0, "WindowWidth": 100.0}, "invalid"),  # made text below
    ({"RescaleSlope": 12345.0}, "invalid"),
])
def test_malformed_header_values_are_an_error_naming_the_file(tmp_path, monkeypatch, elements,
                                                             reason):
    from pydicom import config
    raw = np.rint(gradient() * 1000).astype(np.uint16)
    # write what a careless PACS might
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    path = write_dicom(tmp_path / "bad.dcm", raw, **elements)
    path.write_bytes(path.read_bytes().replace(b"12345.0", b"text!!!"))  # a DS that is no number
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert info.value.path == str(path)


def test_a_huge_png_is_reduced_not_refused(tmp_path, recwarn):
    """10000 x 10000 pixels (under the command line's limit): reduced while decoding to at
    most 4096 a side, without Pillow's bomb warning reaching the user."""
    Image.new("L", (10000, 10000), 0).save(tmp_path / "huge.png")
    gray = read_image(tmp_path / "huge.png")
    assert max(gray.shape) <= 4096 and gray.shape[0] == gray.shape[1]
    assert not [w for w in recwarn if "DecompressionBomb" in str(w.category)]


def test_exif_orientation_is_applied(tmp_path):
    pixels = (gradient(40, 30) * 255).astype(np.uint8)  # dark left, bright right
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    gray = read_image(tmp_path / "rotated.jpg")
    assert gray.shape == (30, 40)  # as shown, not as stored
    assert gray[0].mean() < gray[-1].mean()  # the dark side is now on top


# Compressed DICOM transfer syntaxes beyond baseline JPEG, on real images: pydicom's own sample
# files, and images transcoded here with GDCM (a real encoder) where no sample has the syntax.
# The decoders are pylibjpeg's plugins (libjpeg, openjpeg), installed with covidxray.
LOSSLESS_SAMPLES = {"MR_small_jp2klossless.dcm": "JPEG 2000 Image Compression (Lossless Only)",
                    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS Lossless Image Compression",
                    "MR_small_RLE.dcm": "RLE Lossless"}
LOSSY_SAMPLES = {"JPGExtended.dcm": "JPEG Extended (Process 2 and 4)",
                 "JPEG2000.dcm": "JPEG 2000 Image Compression",
                 "JPEGLSNearLossless_16.dcm": "JPEG-LS Lossy (Near-Lossless) Image Compression"}


def _sample(name):
    from pydicom.data import get_testdata_file
    return get_testdata_file(name)


def _transcode(source, target, syntax: str):
    """``source`` rewritten by GDCM in ``syntax`` (a gdcm.TransferSyntax name)."""
    gdcm = pytest.importorskip("gdcm")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target


@pytest.mark.parametrize("name", LOSSLESS_SAMPLES)
def test_lossless_dicom_syntaxes_give_the_uncompressed_pixels(name):
    import pydicom
    assert pydicom.dcmread(_sample(name)).file_meta.TransferSyntaxUID.name == \
        LOSSLESS_SAMPLES[name]
    np.testing.assert_array_equal(read_image(_sample(name)), read_image(_sample("MR_small.dcm")))


@pytest.mark.parametrize("name", LOSSY_SAMPLES)
def test_lossy_dicom_syntaxes_are_read(name):
    import pydicom
    header = pydicom.dcmread(_sample(name), stop_before_pixels=True)
    assert header.file_meta.TransferSyntaxUID.name == LOSSY_SAMPLES[name]
    pixels = read_image(_sample(name))
    assert pixels.shape == (header.Rows, header.Columns) and pixels.std() > 0.05


def test_jpeg_lossless_process_14_transcoded_by_gdcm(tmp_path):
    import pydicom
    path = _transcode(_sample("MR_small.dcm"), tmp_path / "ljpeg.dcm",
                      "JPEGLosslessProcess14_1")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    np.testing.assert_array_equal(read_image(path), read_image(_sample("MR_small.dcm")))


@pytest.mark.parametrize("syntax", ["JPEGLosslessProcess14_1", "JPEGLSLossless",
                                    "JPEG2000Lossless"])
def test_real_chest_xray_in_each_lossless_syntax(tmp_path, syntax):
    original = DICOM_DIR / "cxr_pa_monochrome1.dcm"
    if not original.is_file():
        pytest.skip(f"{DICOM_DIR} is absent")
    path = _transcode(original, tmp_path / f"{syntax}.dcm", syntax)
    # GDCM decoded the baseline JPEG itself before re-encoding: its IDCT may differ from
    # libjpeg's by a grey level here and there
    np.testing.assert_allclose(read_image(path), read_image(original), atol=2 / 255)


def test_a_multi_frame_bomb_is_refused_from_its_header(tmp_path):
    """300 frames of 1000 x 1000 behind a few hundred KB: every frame counts against the
    budget, refused before anything is inflated or decoded."""
    import tracemalloc
    path = write_dicom(tmp_path / "frames.dcm", np.zeros((1000, 1000), np.uint8), bits=8,
                       deflated=True, pixel_data=bytes(300 * 1000 * 1000), NumberOfFrames=300)
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    with pytest.raises(ImageReadError, match="300 frames and samples is over the limit"):
        read_image(path, max_pixels=60_000_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000
    from covidxray.pixels.decode import declared_pixels
    assert declared_pixels(path, path.read_bytes()) == 300_000_000


def test_a_deflated_multi_frame_dicom_is_inflated_only_to_its_first_frame(tmp_path):
    """The first frame is decoded; what follows it in the deflated stream is never inflated
    (here it is cut off: reading it would fail)."""
    first = np.rint(gradient(64, 64) * 4000).astype(np.uint16)
    later = np.random.default_rng(0).integers(0, 4000, (2, 64, 64)).astype(np.uint16)
    path = write_dicom(tmp_path / "three.dcm", first, deflated=True,
                       pixel_data=first.tobytes() + later.tobytes(), NumberOfFrames=3)
    whole = read_image(path)
    np.testing.assert_allclose(whole, first / first.max(), atol=1e-6)
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:len(data) - 8000])  # the later frames' part of the stream is gone
    np.testing.assert_array_equal(read_image(cut), whole)


def test_a_multi_frame_bomb_is_refused_on_every_path_to_the_model(tiny_run, tmp_path, capsys):
    """300 declared frames of 1000x1000 (a few hundred KB, deflated): read_image, the
    predictor's one preparation path and ``covidxray predict`` all refuse it by name."""
    from covidxray.cli import main
    from covidxray.config import Preprocessing
    from covidxray.run.inputs import prepare_input
    path = write_dicom(tmp_path / "frames.dcm", np.zeros((1000, 1000), np.uint8), bits=8,
                       deflated=True, pixel_data=bytes(300 * 1000 * 1000), NumberOfFrames=300)
    with pytest.raises(ImageReadError, match="300 frames .* over the limit"):
        read_image(path)
    with pytest.raises(ImageReadError, match="over the limit"):
        prepare_input(path, Preprocessing(64))
    code = main(["predict", str(tiny_run), str(path)])
    printed = capsys.readouterr().out
    assert code == 1 and "frames.dcm" in printed and "over the limit" in printed


def test_damaged_jpeg_in_a_dicom_is_an_error_not_an_abort(tmp_path):
    """A JPEG-baseline DICOM whose quantisation table marker is damaged: GDCM (installed by the
    test extra) throws a C++ exception on it that aborts the whole process, so a server would
    go down with one upload. Decoding never uses GDCM: the file is refused, named."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit
    buffer = io.BytesIO()
    Image.fromarray((gradient(64, 64) * 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    jpeg = bytearray(buffer.getvalue())
    jpeg[20], jpeg[54] = 211, 58  # the DQT marker (after SOI and JFIF's APP0), a value in it
    path = write_dicom(tmp_path / "damaged.dcm", gradient(64, 64), bits=8,
                       pixel_data=encapsulate([bytes(jpeg)]), PatientName="test")
    dataset = pydicom.dcmread(path)
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.save_as(path)
    script = ("import sys\nfrom covidxray.pixels.decode import ImageReadError, decode\n"
              "try:\n    decode(sys.argv[1])\nexcept ImageReadError as error:\n"
              "    print(error)\n")
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "damaged.dcm" in done.stdout and "cannot decode DICOM pixel data" in done.stdout
