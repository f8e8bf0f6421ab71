"""Inputs: what is to be predicted (files as given, CSV lists of paths, folders searched with
their links followed once), and the one place an input (a path, the bytes of a file or an
array) becomes a model's input, ``Prepared``."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidxray.config import READ, Preprocessing
from covidxray.pixels.decode import ImageReadError, decode, decode_array, is_image_candidate
from covidxray.pixels.preprocess import crop_region, prepare
from covidxray.pixels.transforms import nearest

log = logging.getLogger(__name__)

ARRAY_NAME = "<array>"


@dataclass
class Prepared:
    """An input read and prepared for the model."""

    name: str
    image: np.ndarray  # (size, size) uint8: the model's input; an ensemble's: (K, size, size)
    gray: np.ndarray  # the decoded input, 2-D float32 in [0, 1], bone bright
    colourfulness: float  # an X-ray has none
    sha256: str  # of the file's bytes, or of an array's pixels
    box: tuple[slice, slice]  # the rows and columns of ``gray`` the crop kept
    lungs: object | None = None  # its pixels.lungfield.LungField (None: no segmenter)

    def lungs_on_input(self) -> np.ndarray | None:
        """The lungs found, on the model's input (cropped and resized as ``image`` is); None
        where no plausible lungs were found."""
        if self.lungs is None or not self.lungs.plausible:
            return None
        rows, cols = self.box
        return nearest(self.lungs.mask_at(self.gray.shape)[rows, cols], self.image.shape[-2:])


def prepare_input(source, preprocessing: Preprocessing | list[Preprocessing],
                  name: str | None = None, max_pixels: int | None = READ.max_pixels,
                  segmenter=None) -> Prepared:
    """The one place an input becomes a model's input: ``source`` a path, the bytes of a file
    (``name`` names it in errors) or an array (``pixels.decode.decode_array``); ``preprocessing`` a
    run's, or its members' (an ensemble: one input per member, stacked). ``segmenter`` (a
    ``model.lungs.LungSegmenter``; needed by a lung crop) finds the lungs. Raises
    ``ImageReadError`` naming the input and the reason (with the ``sha256`` of what was read,
    when something was)."""
    if isinstance(source, np.ndarray):
        name = name or ARRAY_NAME
        sha256 = hashlib.sha256(np.ascontiguousarray(source).tobytes()).hexdigest()
        try:
            decoded = decode_array(source)
        except ValueError as error:
            raise ImageReadError(name, str(error)) from error
        return _prepared(name, decoded, sha256, preprocessing, segmenter)
    if isinstance(source, (bytes, bytearray)):
        name, data = name or "<bytes>", bytes(source)
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageReadError(name, f"cannot read file ({exc.strerror or exc})") from exc
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode(name, data, max_pixels)
    except ImageReadError as error:
        error.sha256 = sha256
        raise
    return _prepared(name, decoded, sha256, preprocessing, segmenter)


def _prepared(name: str, decoded, sha256: str, preprocessing, segmenter) -> Prepared:
    lungs = segmenter.field(decoded.gray) if segmenter is not None else None
    specs = preprocessing if isinstance(preprocessing, list) else [preprocessing]
    images = [prepare(decoded.gray, spec, lungs) for spec in specs]
    return Prepared(name, np.stack(images) if isinstance(preprocessing, list) else images[0],
                    decoded.gray, decoded.colourfulness, sha256,
                    crop_region(decoded.gray.shape, specs[0], lungs), lungs)


def collect_paths(inputs) -> list[str]:
    """The files to predict, in order: files as given (whatever their suffix, so that a bad
    one is reported, not ignored), CSV lists of paths (a ``path`` or ``file`` column, relative
    to the list), and folders searched recursively for image files, in sorted order.

    A symlinked folder is followed once: a link back to a folder already searched (a loop) is
    skipped with a warning naming it. A broken link is kept, so that its row says it cannot
    be read, with a warning too: nothing is left out silently."""
    paths = []
    for item in map(Path, inputs):
        if item.is_file() and item.suffix.lower() == ".csv":
            paths += _listed(item)
        elif item.is_dir():
            paths += _files_under(item)
        else:
            paths.append(str(item))
    return paths


def _listed(listing: Path) -> list[str]:
    import csv
    with open(listing, newline="") as handle:
        rows = [row.get("path") or row.get("file") or "" for row in csv.DictReader(handle)]
    return [str(path if path.is_absolute() else listing.parent / path)
            for path in map(Path, filter(None, rows))]


def _files_under(folder: Path) -> list[str]:
    """Image files under ``folder``, links to folders followed once (loops skipped), broken
    links kept; each skipped loop and broken link named in a warning."""
    found, seen = [], set()

    def identity(path: Path):
        info = path.stat()
        return info.st_dev, info.st_ino

    def walk(directory: Path) -> None:
        seen.add(identity(directory))
        try:
            entries = sorted(directory.iterdir())
        except OSError as error:
            log.warning("%s: cannot be listed (%s): skipped", directory,
                        error.strerror or error)
            return
        for entry in entries:
            if entry.is_symlink() and not entry.exists():
                log.warning("%s: a broken link (to %s): listed as unreadable", entry,
                            os.readlink(entry))
                found.append(str(entry))
            elif entry.is_dir():
                if identity(entry) in seen:
                    log.warning("%s: a link back to a folder already searched (a loop): "
                                "skipped", entry)
                    continue
                walk(entry)
            elif is_image_candidate(entry):
                found.append(str(entry))

    walk(folder)
    return found
