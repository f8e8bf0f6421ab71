"""Decoding: an image file, its bytes or an array in memory -> one float32 grayscale array,
bone bright, or an ``ImageReadError`` that names the file and says why it cannot be.

PNG, JPEG, TIFF and BMP through Pillow, DICOM through pydicom; the pixels a header declares
(every frame and sample of a DICOM) are checked against the budget before anything is decoded
or inflated. What is then done to the image for the model is ``pixels.preprocess``.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covidxray.errors import UserError
from covidxray.config import READ

# larger images are reduced (JPEG: while decoding) by a whole factor to at most this side
# before anything else: no radiograph needs more, and a 10000 px file would need gigabytes
DECODE_MAX_SIDE = 4096

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageReadError(UserError):
    """A file that cannot be used as an image; carries the path and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def is_image_candidate(path: Path) -> bool:
    """A file a folder search takes as an image: a known suffix, or none (DICOM exports often
    have none); README, CSV and hidden files are not."""
    return path.is_file() and not path.name.startswith(".") and \
        (path.suffix.lower() in IMAGE_SUFFIXES or path.suffix == "")


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry 'DICM' after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


@dataclass
class Decoded:
    """A decoded file: grayscale pixels, and how colourful the file was before conversion."""

    gray: np.ndarray  # 2-D float32 in [0, 1], bone bright
    colourfulness: float  # mean over pixels of max(R, G, B) - min(R, G, B), in [0, 1]; 0 if gray


def colourfulness(rgb: np.ndarray) -> float:
    """Mean chroma of an (H, W, 3) array in [0, 1]: 0 for any gray image, X-rays included."""
    rgb = np.asarray(rgb, dtype=np.float32)
    return float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())


def read_image(path: str | Path, data: bytes | None = None,
               max_pixels: int | None = READ.max_pixels) -> np.ndarray:
    """Decode ``path`` (or ``data``, its bytes) into a 2-D float32 array in [0, 1], bone bright.

    The format is decided by the content, not the name. Raises ``ImageReadError`` naming the path
    and the reason for empty, truncated, unsupported or non-image files, and for images of more
    than ``max_pixels`` pixels (checked from the header, before decoding).
    """
    return decode(path, data, max_pixels).gray


def decode(path: str | Path, data: bytes | None = None,
           max_pixels: int | None = READ.max_pixels) -> Decoded:
    """``read_image`` that also keeps the file's colourfulness (an X-ray has none).

    The one boundary every file crosses: whatever goes wrong inside (a header value, a
    decoder, memory) leaves it as an ``ImageReadError`` naming the file and the reason.
    """
    try:
        return _decode(path, data, max_pixels)
    except ImageReadError:
        raise
    except MemoryError as exc:
        raise ImageReadError(path, "not enough memory to decode this image") from exc
    except Exception as exc:  # any decoder, any header value: this file, not the caller's bug
        raise ImageReadError(path, f"cannot decode ({type(exc).__name__}: {exc})") from exc


def _decode(path, data: bytes | None, max_pixels: int | None) -> Decoded:
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise ImageReadError(path, "empty file")
    if is_dicom(data) or Path(str(path)).suffix.lower() in DICOM_SUFFIXES:
        gray, colour = _read_dicom(path, data, max_pixels)
    else:
        gray, colour = _read_pillow(path, data, max_pixels)
    if gray.ndim != 2 or min(gray.shape) < 8:
        raise ImageReadError(path, f"image too small or not 2-D (shape {gray.shape})")
    if not np.all(np.isfinite(gray)):
        raise ImageReadError(path, "image contains NaN or infinite values")
    return Decoded(gray, colour)


def header_facts(path: str | Path, data: bytes) -> tuple[int, int, str, int]:
    """(width, height, mode, bits) as the header declares them, read without decoding the
    pixel data; raises ``ImageReadError`` when there is no readable header."""
    try:
        if is_dicom(data) or Path(str(path)).suffix.lower() in DICOM_SUFFIXES:
            header = _dicom_header(path, data)
            return (int(header.get("Columns", 0) or 0), int(header.get("Rows", 0) or 0),
                    str(header.get("PhotometricInterpretation", "")),
                    int(header.get("BitsStored", 0) or 0))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                bits = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32,
                        "F": 32}.get(image.mode, 8)
                return image.width, image.height, image.mode, bits
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, f"no readable image header ({type(exc).__name__}: "
                                   f"{exc})") from exc


def decode_array(array: np.ndarray) -> Decoded:
    """An image already in memory, decoded as a file of the same pixels would be: 2-D gray
    (8-bit; 10- to 16-bit scaled by the bit depth that holds the data; float in [0, 1]), or
    (H, W, 2 | 3 | 4) gray + alpha, RGB or RGBA (8-bit, or float in [0, 1]: luma, alpha
    composited on black). Raises ``ValueError`` for anything else."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer)
                                   or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"expected integer or float pixels, got {array.dtype}")
    if array.ndim == 2:
        gray = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 \
            else _scale_high_bit_depth(array)
        return Decoded(gray, 0.0)
    if array.ndim != 3 or array.shape[-1] not in (2, 3, 4):
        raise ValueError(f"expected a 2-D gray or (H, W, 2|3|4) image, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        array = np.rint(np.clip(array, 0, 1) * 255)
    elif array.dtype != np.uint8:
        raise ValueError(f"colour images must be 8-bit or float in [0, 1], got {array.dtype}")
    mode = {2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[-1]]
    gray, colour = _pillow_to_gray(Image.fromarray(array.astype(np.uint8), mode=mode))
    return Decoded(gray, colour)


def _check_pixels(path, width: int, height: int, max_pixels: int | None,
                  planes: int = 1) -> None:
    """``planes``: frames x samples of a DICOM, each of width x height; all count."""
    if width <= 0 or height <= 0:
        raise ImageReadError(path, f"the header declares no image ({width}x{height} pixels)")
    if max_pixels is not None and width * height * planes > max_pixels:
        what = f"{width}x{height} pixels" + (f" x {planes} frames and samples" if planes > 1
                                             else "")
        raise ImageReadError(path, f"image of {what} is over the limit of {max_pixels} pixels")


def dicom_layout(path, header) -> tuple[int, int, int, int, int]:
    """(rows, columns, frames, samples per pixel, bits allocated) a DICOM header declares,
    each checked to be one this reader can use."""
    rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
    if not rows or not columns:
        raise ImageReadError(path, "the DICOM header declares no image (no Rows and Columns)")
    samples = int(header.get("SamplesPerPixel", 1) or 1)
    bits = int(header.get("BitsAllocated", 16) or 16)
    if samples not in (1, 3) or bits not in (1, 8, 16, 32):
        raise ImageReadError(path, f"unsupported DICOM pixel layout ({samples} samples of "
                                   f"{bits} bits)")
    frames = int(header.get("NumberOfFrames", 1) or 1)
    if frames < 1:
        raise ImageReadError(path, f"the DICOM header declares {frames} frames")
    return rows, columns, frames, samples, bits


def declared_pixels(path, data: bytes) -> int:
    """What a file's header declares, in pixels, every frame and sample of a DICOM counted;
    read without decoding (0: no readable header: reading the file will say why)."""
    try:
        if is_dicom(data) or Path(str(path)).suffix.lower() in DICOM_SUFFIXES:
            rows, columns, frames, samples, _ = dicom_layout(path, _dicom_header(path, data))
            return rows * columns * frames * samples
        width, height, _, _ = header_facts(path, data)
    except ImageReadError:
        return 0
    return width * height


def _read_pillow(path, data: bytes, max_pixels: int | None = None) -> tuple[np.ndarray, float]:
    try:
        with warnings.catch_warnings():  # our own limit is checked first, from the header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                _check_pixels(path, image.width, image.height, max_pixels)
                if image.format == "JPEG" and max(image.size) > DECODE_MAX_SIDE:
                    # decode a JPEG at a fraction of its size: never the whole huge image
                    image.draft(image.mode, (image.width * DECODE_MAX_SIDE // max(image.size),
                                             image.height * DECODE_MAX_SIDE // max(image.size)))
                image.load()  # decodes now, so truncated files fail here
                image = ImageOps.exif_transpose(image)  # as a viewer shows it
                factor = -(-max(image.size) // DECODE_MAX_SIDE)
                if factor > 1 and image.mode in ("L", "RGB", "RGBA", "I", "F", "LA"):
                    image = image.reduce(factor)
                return _pillow_to_gray(image)
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, "not a recognised image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"too many pixels (decompression bomb guard): {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"corrupt or truncated image ({exc})") from exc


def _pillow_to_gray(image: Image.Image) -> tuple[np.ndarray, float]:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _scale_high_bit_depth(np.asarray(image)), 0.0
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        # composite on black: transparent margins become the dark film border
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    colour = 0.0
    if image.mode not in ("L", "1", "I;16"):
        colour = colourfulness(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    return np.asarray(image.convert("L"), dtype=np.float32) / 255.0, colour


def _scale_high_bit_depth(array: np.ndarray) -> np.ndarray:
    """Scale integer data by the smallest common bit depth (8/10/12/14/16) that holds it.

    Medical PNG/TIFF exports often store 10-16 significant bits in a 16-bit container;
    dividing a 12-bit image by 65535 would make it nearly black.
    """
    if np.issubdtype(array.dtype, np.floating) and array.min(initial=0) >= 0 \
            and array.max(initial=0) <= 1:
        return array.astype(np.float32)  # float data already in [0, 1]
    array = array.astype(np.float64)
    low = min(array.min(initial=0), 0.0)
    array = array - low
    top = array.max(initial=0)
    for bits in (8, 10, 12, 14, 16, 32):
        if top <= 2**bits - 1:
            return (array / (2**bits - 1)).astype(np.float32)
    return (array / top).astype(np.float32)


DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
DICOM_HEADER_BYTES = 1 << 20  # inflated before the header is read: far more than any header


def _dicom_header(path, data: bytes):
    """The data set without its pixel data, read without inflating or decoding them."""
    import pydicom
    if _is_deflated(data):
        return _inflated_dataset(path, data, DICOM_HEADER_BYTES)
    return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def _is_deflated(data: bytes) -> bool:
    return DEFLATED.encode() in data[:4096]  # the transfer syntax, in the file meta group


def _inflated_dataset(path, data: bytes, limit: int):
    """The header of a deflated data set (everything before its pixel data), inflated up to
    ``limit`` bytes, as a pydicom ``Dataset`` of explicit VR little endian."""
    return _inflate_to_pixels(path, data, limit)[0]


def _inflate_to_pixels(path, data: bytes, limit: int):
    """Inflate a deflated data set up to ``limit`` bytes: its header as a ``Dataset``, and
    (the inflated bytes, the offset of its pixel data element in them or None, the inflater to
    go on from where it stopped)."""
    import pydicom
    from pydicom.filereader import read_dataset
    if not is_dicom(data):
        raise ImageReadError(path, "deflated DICOM without the DICM preamble")
    (group_length,) = struct.unpack("<I", data[140:144])  # (0002,0000) UL: meta group length
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    body = inflater.decompress(data[144 + group_length:], limit)
    stream = io.BytesIO(body)
    dataset = read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                           stop_when=lambda tag, vr, length: tag == 0x7FE00010)
    dataset.file_meta = pydicom.dataset.FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    offset = stream.tell() if body[stream.tell():stream.tell() + 4] == b"\xe0\x7f\x10\x00" \
        else None
    return dataset, (body, offset, inflater)


def _deflated_first_frame(path, data: bytes, frame_bytes: int, frames: int):
    """A deflated data set with the pixel data of its first frame alone, inflated no further
    than that frame: the rest of the stream (other frames, or a bomb) is never inflated. Pixel
    data longer than the header declares is refused without inflating it."""
    dataset, (body, offset, inflater) = _inflate_to_pixels(path, data, DICOM_HEADER_BYTES)
    if offset is None:
        raise ImageReadError(path, "no pixel data in the first "
                                   f"{DICOM_HEADER_BYTES} bytes of the deflated data set")
    (length,) = struct.unpack("<I", body[offset + 8:offset + 12])  # OB/OW: 4-byte length
    declared = frames * frame_bytes
    if length == 0xFFFFFFFF:
        raise ImageReadError(path, "compressed (encapsulated) pixel data inside a deflated "
                                   "data set is not supported")
    if length > declared + 1:  # one byte of padding to an even length
        raise ImageReadError(path, f"the deflated pixel data inflates beyond the {declared} "
                                   f"bytes its header declares ({length} bytes: a "
                                   f"decompression bomb?)")
    needed = offset + 12 + frame_bytes
    while len(body) < needed and inflater.unconsumed_tail:
        body += inflater.decompress(inflater.unconsumed_tail, needed - len(body))
    if len(body) < needed:
        raise ImageReadError(path, "the deflated pixel data end before the first frame does")
    dataset.PixelData = body[offset + 12:needed]
    if "NumberOfFrames" in dataset:
        dataset.NumberOfFrames = 1
    return dataset


def _read_dicom(path, data: bytes, max_pixels: int | None = None) -> tuple[np.ndarray, float]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    header = _dicom_header(path, data)
    rows, columns, frames, samples, bits = dicom_layout(path, header)
    _check_pixels(path, columns, rows, max_pixels, frames * samples)
    try:
        if _is_deflated(data):  # the first frame alone, never the rest of the stream
            frame_bytes = -(-rows * columns * samples * bits // 8)
            dataset = _deflated_first_frame(path, data, frame_bytes, frames)
            pixels = _first_frame(path, dataset, 1)
        else:
            dataset = pydicom.dcmread(io.BytesIO(data), force=True)
            pixels = _first_frame(path, dataset, frames)
    except ImageReadError:
        raise
    except Exception as exc:  # pydicom raises many types for bad or undecodable data
        raise ImageReadError(path, f"cannot decode DICOM pixel data ({exc})") from exc
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if pixels.ndim == 3 and pixels.shape[-1] == 3:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space
                pixels = convert_color_space(pixels, photometric, "RGB")
            rgb = _min_max(pixels.astype(np.float32))
            return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32), colourfulness(rgb)
        raise ImageReadError(path, f"unsupported DICOM photometric interpretation "
                                   f"{photometric[:40]!r}")
    try:
        values = apply_modality_lut(pixels, dataset).astype(np.float64)
        if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
            _check_window(path, dataset)
            values = apply_voi_lut(values, dataset).astype(np.float64)
    except ImageReadError:
        raise
    except Exception as exc:
        raise ImageReadError(path, f"invalid rescale or window values in the DICOM header "
                                   f"({type(exc).__name__}: {exc})") from exc
    gray = _min_max(values)
    if photometric == "MONOCHROME1":  # low values are bright in MONOCHROME1
        gray = 1.0 - gray
    return gray, 0.0


def _first_frame(path, dataset, frames: int) -> np.ndarray:
    """The first frame's pixels, decoded by pydicom's plugins for the transfer syntax in turn,
    never by GDCM: it aborts the whole process (a C++ exception) on some damaged JPEG data,
    which would take a server down with one upload."""
    from pydicom.pixels import get_decoder, pixel_array
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    decoder = get_decoder(syntax) if syntax is not None else None
    if decoder is None or decoder.is_native:
        return pixel_array(dataset, index=0 if frames > 1 else None)
    plugins = [name for name in decoder.available_plugins if name != "gdcm"]
    if not plugins:
        raise ImageReadError(path, f"no decoder for DICOM {syntax.name} is installed but GDCM, "
                                   f"which covidxray does not use (reinstall covidxray: pylibjpeg "
                                   f"decodes it)")
    for plugin in plugins:
        try:
            return pixel_array(dataset, index=0 if frames > 1 else None,
                               decoding_plugin=plugin)
        except Exception as exc:  # the next plugin may read what this one cannot
            error = exc
    raise error


def _check_window(path, dataset) -> None:
    """A VOI window must have a positive width (PS3.3 C.11.2.1.2)."""
    if "WindowWidth" not in dataset:
        return
    for width in np.atleast_1d(dataset.WindowWidth):
        if not float(width) > 0:
            raise ImageReadError(path, f"invalid DICOM window width {width!r} (must be > 0)")


def _min_max(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)
