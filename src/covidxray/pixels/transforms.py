"""Image transforms that remove or blur what tells the sources apart, not the disease.

Two kinds, both on 2-D grayscale float images in [0, 1] (what ``decode.read_image`` returns)
and both returning the same shape, dtype float32 and range:

- intensity normalisation, deterministic, meant for every image the model sees (training and
  use alike): ``percentile_window`` (robust windowing), ``equalize_histogram`` and ``clahe``;
  and ``crop_border``, which keeps the centre, away from text, markers and collimation edges;
- source-cue augmentation, random and seeded, for training only: gamma, blur, noise, JPEG
  re-encoding at a random quality, random black or white borders, random crop and rescale.

``source_cue_view`` and ``mean_over_views`` turn the augmentation into test-time augmentation.

Array form: ``f(image, ...)`` or ``f(image, rng, ...)``. Dictionary form (as MONAI has both):
``apply_to_item(transform, item, rng)`` changes ``item["image"]`` and leaves every other key,
the label first of all, untouched.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from covidxray.config import INTENSITY_MODES


def _checked(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {image.shape}")
    return image


def percentile_window(image: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles to 0 and 1 and clip: the exposure and the
    window a source chose stop mattering, and a few burnt-in labels cannot set the range."""
    image = _checked(image)
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0, 1).astype(np.float32)


def equalize_histogram(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """Global histogram equalisation: every image gets a flat grey-level histogram."""
    image = _checked(image)
    counts, edges = np.histogram(image, bins=bins, range=(0.0, 1.0))
    cdf = np.cumsum(counts).astype(np.float64)
    if cdf[-1] == 0 or cdf[-1] == cdf[0]:
        return np.zeros_like(image)
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    # np.interp(image, edges[1:], cdf) on the evenly spaced edges, by index, in place in one
    # array (np.take on small indices): a fifth of the time on a full-resolution film
    position = image * np.float32(bins)
    position -= np.float32(1)
    np.clip(position, 0, bins - 1, out=position)
    below = position.astype(np.uint8 if bins <= 256 else np.int32)
    np.minimum(below, bins - 2, out=below)
    position -= below
    position *= np.take(np.diff(cdf).astype(np.float32), below)
    position += np.take(cdf[:-1].astype(np.float32), below)
    return position


def clahe(image: np.ndarray, clip_limit: float = 0.01, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image), ``tiles`` per side."""
    from skimage.exposure import equalize_adapthist
    image = _checked(image)
    kernel = max(8, min(image.shape) // tiles)
    return equalize_adapthist(np.clip(image, 0, 1), kernel_size=kernel,
                              clip_limit=clip_limit).astype(np.float32)


def normalise_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """One of ``INTENSITY_MODES`` by name."""
    if mode == "none":
        return _checked(image)
    if mode == "percentile":
        return percentile_window(image)
    if mode == "equalize":
        return equalize_histogram(image)
    if mode == "clahe":
        return clahe(image)
    raise ValueError(f"unknown intensity mode {mode!r}; choose from {INTENSITY_MODES}")


# lungs hidden (evaluation) or kept alone (Preprocessing.fill) are first grown by this share of
# the image's side, so that their edges, where a segmenter's outline is least sure, go with them
LUNG_MARGIN = 0.03


def dilated(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Boolean masks (..., h, w) grown by ``pixels`` in every direction (a square), one axis
    at a time."""
    grown = np.asarray(masks, bool)
    for axis in (-2, -1):
        source, grown = grown, grown.copy()
        n = source.shape[axis]
        for k in range(1, min(pixels, n - 1) + 1):
            ahead = [slice(None)] * source.ndim
            behind = [slice(None)] * source.ndim
            ahead[axis], behind[axis] = slice(k, None), slice(None, n - k)
            grown[tuple(ahead)] |= source[tuple(behind)]
            grown[tuple(behind)] |= source[tuple(ahead)]
    return grown


def nearest(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A 2-D array at another resolution, by nearest neighbour (masks stay boolean)."""
    rows = np.arange(shape[0]) * mask.shape[0] // shape[0]
    cols = np.arange(shape[1]) * mask.shape[1] // shape[1]
    return mask[rows][:, cols]


def grown_lungs(masks: np.ndarray) -> np.ndarray:
    """Lung masks (..., h, w) grown by ``LUNG_MARGIN`` of their side."""
    return dilated(masks, max(1, round(LUNG_MARGIN * np.shape(masks)[-1])))


def crop_box(shape: tuple[int, int], fraction: float) -> tuple[slice, slice]:
    """The rows and columns ``crop_border`` keeps of an image of ``shape``."""
    if not 0 <= fraction < 0.5:
        raise ValueError(f"crop fraction must be in [0, 0.5), got {fraction}")
    rows, cols = (int(round(n * fraction)) for n in shape)
    return slice(rows, shape[0] - rows), slice(cols, shape[1] - cols)


def crop_border(image: np.ndarray, fraction: float) -> np.ndarray:
    """The centre of the image with ``fraction`` of each side removed (0 keeps all)."""
    image = _checked(image)
    return image[crop_box(image.shape, fraction)]


def uncrop(inner: np.ndarray, shape: tuple[int, int],
           box: tuple[slice, slice]) -> np.ndarray:
    """A map of the cropped image (any size) placed back on an image of ``shape``: resized to
    the region ``box`` (rows, columns) that the crop kept, zero where it cut."""
    rows, cols = box
    out = np.zeros(shape, np.float32)
    out[rows, cols] = resize(inner, (rows.stop - rows.start, cols.stop - cols.start))
    return out


def resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float image resized (bilinear) to ``shape`` (rows, columns)."""
    return np.asarray(Image.fromarray(np.asarray(image, np.float32), mode="F").resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR))


def random_gamma(image, rng: np.random.Generator, spread: float = 0.4) -> np.ndarray:
    """``image ** gamma``, gamma log-uniform in [1 / (1 + spread), 1 + spread]."""
    gamma = np.exp(rng.uniform(-np.log1p(spread), np.log1p(spread)))
    return np.clip(_checked(image), 0, 1) ** np.float32(gamma)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """A 2-D Gaussian blur as ``scipy.ndimage.gaussian_filter`` does it (kernel cut at 4 sigma,
    mirrored edges), in numpy: test-time views run on the predict path, which must not import
    scipy."""
    radius = int(4 * sigma + 0.5)
    if radius == 0:
        return np.asarray(image, np.float32)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    windows = np.lib.stride_tricks.sliding_window_view
    padded = np.pad(np.asarray(image, np.float64), radius, mode="symmetric")
    rows = windows(padded, len(kernel), axis=0) @ kernel
    return (windows(rows, len(kernel), axis=1) @ kernel).astype(np.float32)


def random_blur_or_noise(image, rng: np.random.Generator, max_sigma: float = 1.5,
                         max_noise: float = 0.03) -> np.ndarray:
    """A Gaussian blur of random width, then Gaussian noise of random strength."""
    image = _checked(image)
    blurred = gaussian_blur(image, rng.uniform(0, max_sigma))
    noisy = blurred + rng.normal(0, rng.uniform(0, max_noise), image.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)


def random_jpeg(image, rng: np.random.Generator, quality: tuple[int, int] = (30, 95)):
    """Re-encoded as JPEG at a random quality: compression artefacts stop naming a source."""
    image = _checked(image)
    buffer = io.BytesIO()
    Image.fromarray(np.rint(np.clip(image, 0, 1) * 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=int(rng.integers(quality[0], quality[1] + 1)))
    buffer.seek(0)
    return (np.asarray(Image.open(buffer).convert("L"), dtype=np.float32) / 255.0)


def random_border(image, rng: np.random.Generator, max_fraction: float = 0.08) -> np.ndarray:
    """Black or white bands of random width on random sides, as scans and screenshots have."""
    image = _checked(image).copy()
    rows, cols = image.shape
    for side in range(4):
        if rng.random() < 0.5:
            continue
        width = int(rng.uniform(0, max_fraction) * (rows if side < 2 else cols))
        value = np.float32(rng.integers(0, 2))
        if width == 0:
            continue
        if side == 0:
            image[:width] = value
        elif side == 1:
            image[rows - width:] = value
        elif side == 2:
            image[:, :width] = value
        else:
            image[:, cols - width:] = value
    return image


def random_crop_rescale(image, rng: np.random.Generator, min_scale: float = 0.8) -> np.ndarray:
    """A random crop of ``min_scale``..1 of each side, resized back to the input shape."""
    image = _checked(image)
    rows, cols = image.shape
    scale = rng.uniform(min_scale, 1.0)
    height, width = max(2, int(rows * scale)), max(2, int(cols * scale))
    top, left = rng.integers(0, rows - height + 1), rng.integers(0, cols - width + 1)
    return np.clip(resize(image[top:top + height, left:left + width], (rows, cols)),
                   0, 1).astype(np.float32)


@dataclass
class SourceAugment:
    """Each source-cue augmentation applied with probability ``p``, in a fixed order."""

    p: float = 0.5
    gamma: float = 0.4
    max_sigma: float = 1.5
    max_noise: float = 0.03
    jpeg_quality: tuple[int, int] = (30, 95)
    border: float = 0.08
    min_scale: float = 0.8

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        steps = [lambda x: random_crop_rescale(x, rng, self.min_scale),
                 lambda x: random_gamma(x, rng, self.gamma),
                 lambda x: random_blur_or_noise(x, rng, self.max_sigma, self.max_noise),
                 lambda x: random_jpeg(x, rng, self.jpeg_quality),
                 lambda x: random_border(x, rng, self.border)]
        image = _checked(image)
        for step in steps:
            if rng.random() < self.p:
                image = step(image)
        return image


def augment_prepared(image: np.ndarray, augment, rng: np.random.Generator) -> np.ndarray:
    """``augment`` of a prepared uint8 image (the model's input), back as uint8."""
    changed = augment(image.astype(np.float32) / 255.0, rng)
    return np.clip(np.rint(changed * 255.0), 0, 255).astype(np.uint8)


def source_cue_view(images: np.ndarray, view: int, seed: int = 0,
                    augment: SourceAugment | None = None) -> np.ndarray:
    """View ``view`` of (n, h, w) uint8 prepared images for test-time augmentation: every image
    gets the same draw of ``augment`` (default ``SourceAugment()``), seeded by ``seed`` and
    ``view`` alone, so an image's view does not depend on the batch it came in."""
    augment = augment or SourceAugment()
    return np.stack([augment_prepared(image, augment, np.random.default_rng((seed, view)))
                     for image in images]).reshape(images.shape)


def mean_over_views(score, images: np.ndarray, views: int, first: np.ndarray | None = None,
                    seed: int = 0) -> np.ndarray:
    """Test-time augmentation: the mean of ``score(images)`` (or ``first``, when already
    computed) and ``score`` of ``views`` source-cue views. A model trained with source-cue
    augmentation is scored on the kind of image it learned from, and no single exposure,
    sharpness or framing decides."""
    stacked = [images] if first is None else []
    stacked += [source_cue_view(images, view, seed) for view in range(views)]
    if not stacked:
        return np.asarray(first, dtype=np.float32)
    # one call for every view: a model's fixed cost per call (Keras' predict) is paid once
    scores = np.asarray(score(np.concatenate(stacked)), dtype=np.float64)
    scores = scores.reshape(len(stacked), len(images), *scores.shape[1:])
    total = scores.sum(axis=0) + (0.0 if first is None else np.asarray(first, np.float64))
    return (total / (views + 1)).astype(np.float32)


def apply_to_item(transform, item: dict, rng: np.random.Generator | None = None) -> dict:
    """Dictionary form: a new item whose ``"image"`` went through ``transform`` (given ``rng``
    when it is random); every other key is kept as it was."""
    image = transform(item["image"], rng) if rng is not None else transform(item["image"])
    return {**item, "image": image}
