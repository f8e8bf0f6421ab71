"""The one preprocessing step: a decoded grayscale image -> the model's (size, size) uint8 input.

Every image the model sees, at training, evaluation, prediction and serving time, goes through
``load_for_model`` (= ``decode.read_image`` then ``prepare``), so a model can never see
differently prepared pixels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from covidxray.config import LUNG_FALLBACK_CROP, Preprocessing
from covidxray.pixels.decode import read_image


def as_preprocessing(spec: int | Preprocessing) -> Preprocessing:
    """An image size alone means: resize only."""
    return spec if isinstance(spec, Preprocessing) else Preprocessing(int(spec))


def crop_region(shape: tuple[int, int], spec: Preprocessing,
                lungs=None) -> tuple[slice, slice]:
    """The rows and columns of an image of ``shape`` that ``spec`` keeps: all but a fixed
    fraction of each side, or, for a lung crop, the box of ``lungs`` (the image's
    ``pixels.lungfield.LungField``) or, where it found no plausible lungs, all but
    ``LUNG_FALLBACK_CROP`` of each side."""
    from covidxray.pixels.transforms import crop_box
    if not spec.lung_crop:
        return crop_box(shape, spec.crop)
    if lungs is None:
        raise ValueError("this preprocessing crops to the lungs: the image's lung field is "
                         "needed (covidxray.model.lungs)")
    return lungs.box(shape) if lungs.plausible else crop_box(shape, LUNG_FALLBACK_CROP)


def prepare(gray: np.ndarray, spec: int | Preprocessing, lungs=None) -> np.ndarray:
    """A [0, 1] grayscale image -> the (size, size) uint8 model input: the crop
    (``crop_region``; ``lungs``: the image's lung field, for a lung crop or fill), ``intensity``
    normalisation, the ``fill`` outside the lungs, bilinear resize to ``image_size`` square (no
    padding, as Keras' ``flow_from_directory`` does), quantised to uint8 (see
    ``config.Preprocessing``)."""
    from covidxray.pixels.transforms import grown_lungs, nearest, normalise_intensity
    spec = as_preprocessing(spec)
    gray = np.asarray(gray, dtype=np.float32)
    box = crop_region(gray.shape, spec, lungs)
    outside = None
    if spec.fill != "none":
        if lungs is None:
            raise ValueError("this preprocessing keeps the lungs alone: the image's lung field "
                             "is needed (covidxray.model.lungs)")
        if lungs.plausible:  # grown at the segmenter's resolution, then brought to the film's
            outside = ~nearest(grown_lungs(lungs.mask), gray.shape)[box]
    gray = gray[box]
    if spec.intensity != "none":
        gray = normalise_intensity(gray, spec.intensity)
    if outside is not None:
        gray = np.where(outside, gray.mean(), gray).astype(np.float32)
    image = Image.fromarray(gray, mode="F")
    image = image.resize((spec.image_size, spec.image_size), Image.Resampling.BILINEAR)
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def load_for_model(path: str | Path, spec: int | Preprocessing,
                   data: bytes | None = None, segmenter=None) -> np.ndarray:
    """The one preprocessing path: file -> (size, size) uint8 grayscale model input.
    ``segmenter`` (a ``model.lungs.LungSegmenter``) finds the lungs of a lung crop."""
    spec = as_preprocessing(spec)
    gray = read_image(path, data)
    return prepare(gray, spec, segmenter.field(gray) if spec.uses_lungs else None)
