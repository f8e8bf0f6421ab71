"""Lung-field geometry: the lungs a segmenter's P(lung) map shows, and the one heat share.

``lung_field`` turns the segmenter's probabilities (``model.lungs.LungSegmenter``) into a
``LungField``: the two largest regions, holes filled, judged against what a frontal chest film's
lungs look like. What the rest of the package does with one: crop to the lungs (``Preprocessing``
with ``crop="lungs"``: ``LungField.box``, the box of the lungs plus ``BOX_MARGIN``), outline them
on an overlay, flag films with no plausible lungs (the out-of-distribution gate), and measure how
much of a heat map lies inside them (``heat_share``, the one measure of that).

Plain numpy: the prediction path loads no scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidxray.pixels.transforms import nearest, resize

# what a frontal chest film's lungs look like (cxr-dev's frontal films against the lateral
# views, CT images and photographs of not-frontal and scikit-image; docs/benchmarks.md): each
# bound lies beyond what 98% or more of frontal films show, so that few are flagged
AREA_RANGE = (0.06, 0.75)  # of the image: both lungs together
MIN_SECOND_LUNG = 0.45  # the smaller lung against the larger (a lateral view shows one field)
# the two lungs lie side by side (wherever the film is centred): their column ranges overlap
# by at most this much of the narrower one's width
MAX_SIDE_OVERLAP = 0.25
MAX_APEX_OFFSET = 0.12  # of the image's height, between the tops of the two lungs
MIN_ELONGATION = 1.0  # height over width of each lung: taller than wide
MIN_HEIGHT = 0.3  # of the image's height, each lung
# pixels the network is unsure of (0.2 < P(lung) < 0.8), against the lungs' area: an image
# it cannot read (a photograph) leaves many
MAX_UNSURE = 0.35
# the lung crop's margin, of the box's own height and width, on each side (not
# transforms.LUNG_MARGIN: the growth of the lungs hidden by the lungs-hidden test)
BOX_MARGIN = 0.06


@dataclass
class LungField:
    """Where the lungs are on one image, at the segmenter's resolution."""

    mask: np.ndarray  # (s, s) bool over the whole image
    area: float  # of the image
    plausible: bool
    reason: str  # why not, when not plausible

    def box(self, shape: tuple[int, int], margin: float = BOX_MARGIN) -> tuple[slice, slice]:
        """Rows and columns of an image of ``shape`` that hold the lungs, with ``margin`` of
        the box's size added on each side (clipped to the image)."""
        rows, cols = np.nonzero(self.mask)
        size = self.mask.shape[0]
        out = []
        for low, high, n in ((rows.min(), rows.max() + 1, shape[0]),
                             (cols.min(), cols.max() + 1, shape[1])):
            pad = margin * (high - low)
            start = int(np.floor(max(0.0, (low - pad) / size) * n))
            stop = int(np.ceil(min(1.0, (high + pad) / size) * n))
            out.append(slice(start, max(stop, start + 1)))
        return out[0], out[1]

    def bounds(self) -> list[float] | None:
        """The lungs' box as fractions of the image (top, bottom, left, right), at the
        segmenter's resolution; None where nothing was segmented."""
        if not self.mask.any():
            return None
        rows, cols = np.nonzero(self.mask)
        size = self.mask.shape[0]
        return [rows.min() / size, (rows.max() + 1) / size, cols.min() / size,
                (cols.max() + 1) / size]

    def mask_at(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask at an image's resolution (nearest neighbour)."""
        return nearest(self.mask, shape)

    def outline(self, shape: tuple[int, int]) -> np.ndarray:
        """The mask's edge at an image's resolution: True on its boundary pixels (a line
        about one pixel in 256 of the image wide)."""
        mask = self.mask_at(shape)
        inner = mask
        for _ in range(max(1, round(max(shape) / 256))):
            inner = _eroded(inner)
        return mask & ~inner


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours are all in ``mask`` (the image's edge counts as outside)."""
    padded = np.pad(mask, 1)
    return (mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
            & padded[1:-1, 2:])


def components(mask: np.ndarray) -> np.ndarray:
    """Labels of the 4-connected regions of a boolean mask (0: background): each region
    takes the smallest flat index + 1 of its pixels. Plain numpy (the prediction path loads
    no scipy), on runs rather than pixels: each row's runs of the mask, joined to the runs
    of the row above whose columns they overlap, then union-find on that graph (minimum
    labels along the joins, with pointer jumping, until nothing changes)."""
    height, width = mask.shape
    edges = np.diff(np.pad(np.asarray(mask, bool).view(np.int8), ((0, 0), (1, 1))), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]
    labels = np.zeros(height * width, np.int64)
    if not len(starts):
        return labels.reshape(height, width)
    # with runs keyed row * (width + 1) + column (sorted, as found), the runs of the row
    # above that a run overlaps are those from ``first`` up to ``last``
    key = rows * (width + 1)
    below = rows > 0
    above = key[below] - (width + 1)
    first = np.searchsorted(key + ends, above + starts[below], side="right")
    last = np.searchsorted(key + starts, above + ends[below], side="left")
    joins = np.maximum(last - first, 0)
    upper = _ranges(first, joins)
    lower = np.repeat(np.nonzero(below)[0], joins)
    root = np.arange(len(starts))
    while True:
        smaller = np.minimum(root[upper], root[lower])
        merged = root.copy()
        np.minimum.at(merged, upper, smaller)
        np.minimum.at(merged, lower, smaller)
        while not np.array_equal(jumped := merged[merged], merged):
            merged = jumped
        if np.array_equal(merged, root):
            break
        root = merged
    flat_starts = rows * width + starts
    lengths = ends - starts
    labels[_ranges(flat_starts, lengths)] = np.repeat(flat_starts[root] + 1, lengths)
    return labels.reshape(height, width)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``start, start + 1, ... start + length - 1`` of each pair, one after the other."""
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(lengths.sum())


def _filled(mask: np.ndarray) -> np.ndarray:
    """``mask`` with its holes filled: background regions that do not touch the edge."""
    background = components(np.pad(~mask, 1, constant_values=True))  # a ring of background
    return (background != background[0, 0])[1:-1, 1:-1]


def lung_field(probabilities: np.ndarray) -> LungField:
    """The two largest connected regions above 0.5 (holes filled), and whether they look like
    the lungs of a frontal film: enough and not too much of the image, side by side, of
    similar size, their tops level, each taller than wide and tall enough, and the
    network sure of them (the bounds above; the reason names the first one failed)."""
    mask = probabilities >= 0.5
    labels = components(mask)
    found, sizes = np.unique(labels[labels > 0], return_counts=True)
    order = np.argsort(sizes)[::-1]
    keep = found[order[:2]]
    mask = _filled(np.isin(labels, keep) & mask)
    area = float(mask.mean())
    return LungField(mask, area, *_judged(probabilities, labels, keep, sizes[order[:2]], area))


def _judged(probabilities, labels, keep, sizes, area) -> tuple[bool, str]:
    """(plausible, why not) of the two largest regions ``keep`` of ``labels``."""
    height, width = labels.shape
    if not AREA_RANGE[0] <= area <= AREA_RANGE[1]:
        return False, (f"predicted lung area {area:.0%} of the image, outside the "
                       f"{AREA_RANGE[0]:.0%}-{AREA_RANGE[1]:.0%} of a frontal chest film")
    if len(keep) < 2 or sizes[1] < MIN_SECOND_LUNG * sizes[0]:
        second = sizes[1] / sizes[0] if len(keep) > 1 else 0.0
        return False, (f"one lung field only (the second region is {second:.0%} the size of "
                       f"the first), as on a lateral view")
    boxes = []
    for region in keep:
        rows, cols = np.nonzero(labels == region)
        boxes.append((rows.min(), rows.max() + 1, cols.min(), cols.max() + 1, cols.mean()))
    (_, _, left_a, right_a, _), (_, _, left_b, right_b, _) = boxes
    overlap = min(right_a, right_b) - max(left_a, left_b)
    if overlap > MAX_SIDE_OVERLAP * min(right_a - left_a, right_b - left_b):
        return False, (f"the two lung regions are not side by side (their columns overlap by "
                       f"{overlap / width:.0%} of the image's width)")
    if abs(boxes[0][0] - boxes[1][0]) > MAX_APEX_OFFSET * height:
        return False, (f"the tops of the two lung regions are "
                       f"{abs(boxes[0][0] - boxes[1][0]) / height:.0%} of the image apart")
    for top, bottom, left, right, _ in boxes:
        if bottom - top < MIN_HEIGHT * height or (bottom - top) < MIN_ELONGATION * (right - left):
            return False, (f"a lung region {(bottom - top) / height:.0%} of the image high and "
                           f"{(bottom - top) / (right - left):.1f} times as high as wide: not "
                           f"the shape of a frontal film's lung")
    unsure = float(((probabilities > 0.2) & (probabilities < 0.8)).sum() / max(
        (probabilities >= 0.5).sum(), 1))
    if unsure > MAX_UNSURE:
        return False, (f"the segmenter is unsure of {unsure:.0%} as many pixels as it calls "
                       f"lung")
    return True, ""


def heat_share(heat: np.ndarray, mask: np.ndarray) -> float:
    """The share of a heat map's mass (negative heat counts as none) that lies inside a boolean
    ``mask``, both over the whole image at any resolutions; 0.0 for a map without mass.

    Measured at the finer of the two: a heat map coarser than the mask is resized up to it
    (bilinear), a coarser mask taken to the heat map's resolution (nearest neighbour)."""
    heat, mask = np.asarray(heat), np.asarray(mask, bool)
    if heat.shape != mask.shape:
        # nothing of the finer one is thrown away: a Grad-CAM grid is spread over the
        # input's mask, a segmenter's mask laid on an image-sized heat map
        if mask.size > heat.size:
            heat = resize(heat, mask.shape)
        else:
            mask = nearest(mask, heat.shape)
    heat = np.clip(np.asarray(heat, np.float64), 0, None)
    total = heat.sum()
    return float((heat * mask).sum() / total) if total > 0 else 0.0


def heat_shares(heats, masks) -> np.ndarray:
    """``heat_share`` of each heat map in its mask (None: no lungs found, NaN)."""
    return np.array([np.nan if mask is None else heat_share(heat, mask)
                     for heat, mask in zip(heats, masks)], dtype=np.float64)
