"""Image/mask pairs for the lung segmenter: read from folders, split by patient, loaded as the
segmenter reads them.

A folder holds ``images/`` and ``masks/`` (a mask of the same name per image) or a
``manifest.csv`` (``file``, ``mask``, optional ``patient_id`` and ``image_license``, paths
relative to the folder).
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidxray.config import Preprocessing
from covidxray.data.dataset import DataError, Record
from covidxray.data.split import assign_splits
from covidxray.pixels.decode import ImageReadError, read_image
from covidxray.pixels.preprocess import prepare

log = logging.getLogger(__name__)

# every pair is of one class: the split is stratified by folder alone
MASK_LABEL = "lungs"


@dataclass(frozen=True)
class MaskPair:
    """An image, its lung mask, and where they come from."""

    image: str
    mask: str
    group: str  # the patient (or the image, when the manifest names none)
    subset: str  # the folder it came from
    licence: str = ""


def read_pairs(folder: str | Path) -> list[MaskPair]:
    """The image/mask pairs of a folder: ``manifest.csv`` (``file``, ``mask``, optional
    ``patient_id`` and ``image_license``, paths relative to the folder), or else every file of
    ``images/`` with the mask of the same name in ``masks/``."""
    folder = Path(folder)
    manifest = folder / "manifest.csv"
    if manifest.is_file():
        with open(manifest, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "file" not in rows[0]:
            raise DataError(f"{manifest}: needs a 'file' column (and 'mask')")
        pairs = [(row["file"], row.get("mask") or f"masks/{Path(row['file']).name}",
                  row.get("patient_id", ""), row.get("image_license", "")) for row in rows]
    else:
        pairs = [(f"images/{p.name}", f"masks/{p.name}", "", "")
                 for p in sorted((folder / "images").glob("*")) if p.is_file()]
    found = []
    for image, mask, patient, licence in pairs:
        if not (folder / mask).is_file():
            log.warning("%s: no mask %s, skipped", folder / image, folder / mask)
            continue
        found.append(MaskPair(str(folder / image), str(folder / mask),
                              f"patient:{patient}" if patient else f"image:{Path(image).name}",
                              folder.name, licence))
    if not found:
        raise DataError(f"{folder}: no image/mask pairs (images/, masks/, manifest.csv)")
    return found


def split_pairs(pairs: list[MaskPair], fractions=(0.7, 0.15, 0.15), seed: int = 0) -> dict:
    """group -> "train" | "val" | "test": the package's one grouped splitter
    (``data.split.assign_splits``), so that the images of one patient, in any folder, share a
    split, and each folder is split in proportion."""
    records = [Record(path=p.image, label=MASK_LABEL, target=0, patient_id=p.group,
                      source=p.subset) for p in pairs]
    return {r.group: r.split for r in assign_splits(records, fractions, seed)}


def load_pairs(pairs: list[MaskPair], size: int):
    """Segmenter inputs (n, s, s) uint8 and soft masks (n, s, s) float32 of readable pairs,
    and the pairs kept."""
    spec = Preprocessing(size, "equalize")
    images, masks, kept = [], [], []
    for pair in pairs:
        try:
            gray = read_image(pair.image)
            mask = read_image(pair.mask) > 0.5
        except ImageReadError as error:
            log.warning("skipped %s", error)
            continue
        if mask.shape != gray.shape:
            log.warning("skipped %s: mask %s of another size", pair.image, pair.mask)
            continue
        images.append(prepare(gray, spec))
        masks.append(prepare(mask.astype(np.float32), size).astype(np.float32) / 255.0)
        kept.append(pair)
    return np.stack(images), np.stack(masks), kept
