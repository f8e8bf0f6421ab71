"""Why the model decided: Grad-CAM overlays, and the border-shortcut check.

The heat maps come from the run's ``Predictor`` (Grad-CAM in closed form,
``covidxray.model.network.cams_from_logit_maps``), on each input's own pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from covidxray.pixels.decode import ImageReadError
from covidxray.pixels.lungfield import heat_shares
from covidxray.pixels.transforms import grown_lungs, resize

BORDER_FRACTION = 0.15  # outer 15% on each side: where text, markers and labels sit


LUNG_OUTLINE_COLOUR = (255, 255, 255)


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: str = "jet", outline: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8: the grayscale image (in [0, 1]) with the colour-mapped heat map blended in,
    more strongly where the heat is higher; ``outline`` (boolean, the image's size): drawn on
    top, e.g. the lungs found (``LungField.outline``)."""
    heat = resize(heatmap, gray.shape) if heatmap.shape != gray.shape else heatmap
    heat = np.clip(np.asarray(heat, np.float32), 0, 1)
    weight = alpha * heat[..., None]
    # (1 - weight) * gray + weight * colour, computed in place in the colours' own array (the
    # same values; a full-resolution film's overlay in half the time)
    blended = heat_colours(heat, colormap)
    blended *= weight
    blended += (1 - weight) * np.asarray(gray, np.float32)[..., None]
    blended *= 255
    rgb = np.clip(np.rint(blended, out=blended), 0, 255, out=blended).astype(np.uint8)
    if outline is not None:
        rgb.reshape(-1, 3)[np.flatnonzero(outline)] = LUNG_OUTLINE_COLOUR
    return rgb


def heat_colours(heat: np.ndarray, colormap: str = "jet", as_bytes: bool = False) -> np.ndarray:
    """RGB of a heat map in [0, 1]: float32 in [0, 1], or with ``as_bytes`` uint8 (those
    times 255, rounded): a matplotlib colour map's own entries, indexed as matplotlib indexes
    them, looked up per pixel (several times faster than calling the colour map on a
    full-resolution film)."""
    table = _colour_table(colormap, as_bytes)
    entries = len(table)
    index = np.minimum(heat * np.float32(entries), np.float32(entries - 1)).astype(
        np.uint8 if entries <= 256 else np.intp)
    return np.take(table, index, axis=0)  # four times as fast as table[index] here


@functools.cache
def _colour_table(colormap: str, as_bytes: bool) -> np.ndarray:
    from matplotlib import colormaps
    table = colormaps[colormap]
    colours = table(np.arange(table.N))[:, :3].astype(np.float32)
    return np.rint(colours * 255).astype(np.uint8) if as_bytes else colours


def border_mask(size: int, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """True on the outer ``fraction`` of each side of a size x size image."""
    edge = int(round(size * fraction))
    mask = np.ones((size, size), bool)
    mask[edge:size - edge, edge:size - edge] = False
    return mask


@dataclass
class ShortcutCheck:
    """Does the model look at the lungs, or at the border (markers, text) and the rest?"""

    border_share: dict  # per class: mean share of Grad-CAM mass in the border
    uniform_border_share: float  # what a heat map spread evenly would give
    occlusion_border: dict  # per class: mean |change in P| when the border is blanked
    occlusion_centre: dict  # per class: the same when the centre is blanked
    flagged: bool
    verdict: str
    # where the lung segmenter found lungs (None: no segmenter): per class (and per source),
    # the mean share of the heat inside them, the share an even spread would put there (their
    # area), and the mean |change in P| when the lungs or everything else is blanked
    lungs_found: int | None = None
    lung_heat_share: dict | None = None
    lung_heat_share_per_source: dict | None = None
    lung_area_share: float | None = None
    occlusion_lungs: dict | None = None
    occlusion_outside_lungs: dict | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def hidden(images: np.ndarray, masks, inside: bool) -> np.ndarray:
    """Model inputs ((n, size, size) uint8, an ensemble's (n, members, size, size)) with their
    lungs (``inside``), or everything but their lungs, filled with the image's mean grey level;
    ``masks``: each image's lungs on its input, grown by ``LUNG_MARGIN`` first (Maguolo and
    Nanni, 2021: a model that still tells the classes apart with the lungs hidden reads
    something else)."""
    images = np.asarray(images)
    where = grown_lungs(np.stack(list(masks)))
    if not inside:
        where = ~where
    if images.ndim == 4:
        where = where[:, None]
    fill = np.rint(images.mean(axis=tuple(range(1, images.ndim)), keepdims=True))
    return np.where(where, fill, images).astype(images.dtype)


def group_means(values: np.ndarray, groups) -> dict:
    """Mean of the finite values per group."""
    groups = np.asarray(groups)
    out = {}
    for group in sorted(set(groups.tolist())):
        chosen = values[(groups == group) & np.isfinite(values)]
        if chosen.size:
            out[str(group)] = float(chosen.mean())
    return out


def shortcut_check(predictor, images: np.ndarray, labels: list[str],
                   batch_size: int = 32, lung_masks=None, sources=None) -> ShortcutCheck:
    """Grad-CAM border share and occlusion of border vs centre, per class, on a run's model
    inputs ((n, size, size) uint8, as its ``Predictor`` prepares them); with ``lung_masks``
    (each image's lungs on its model input, ``Prepared.lungs_on_input``; None where none were
    found), also the share of heat inside the lungs and the occlusion of the lungs against
    everything else, per class and per ``sources``.

    Flagged when blanking the border changes P(COVID) more than blanking the centre, when the
    Grad-CAM mass in the border clearly exceeds what an even spread would put there, when
    blanking everything but the lungs changes P(COVID) more than blanking the lungs, or when
    less heat lies inside the lungs than an even spread would put there.
    """
    images = np.asarray(images)  # (n, size, size), an ensemble's (n, members, size, size)
    size = images.shape[-1]
    border = border_mask(size)
    # heat share measured on the maps upsampled to the image, as they are shown
    cams = np.stack([resize(cam, (size, size))
                     for cam in predictor.heatmaps_prepared(images, batch_size)])
    mass = cams.sum(axis=(1, 2))
    share = np.divide((cams * border).sum(axis=(1, 2)), mass, out=np.zeros_like(mass),
                      where=mass > 0)
    fill = images.mean(axis=tuple(range(1, images.ndim)), keepdims=True)

    def score(x):  # each image alone: the views would only blur the occlusion
        return predictor.predict_prepared(x, batch_size, test_time_views=0)

    def blanked(where: np.ndarray, chosen=slice(None)) -> np.ndarray:
        if where.ndim == 3 and images.ndim == 4:  # one mask per image, for every member
            where = where[:, None]
        return np.abs(score(np.where(where, fill[chosen], images[chosen]).astype(images.dtype))
                      - base[chosen])

    base = score(images)
    delta_border, delta_centre = blanked(border), blanked(~border)
    labels = np.asarray(labels)
    uniform = float(border.mean())
    border_effect, centre_effect = float(delta_border.mean()), float(delta_centre.mean())
    heat_in_border = float(share.mean())
    reasons = []
    if border_effect > centre_effect:
        reasons.append(f"blanking the border changes P(COVID) by {border_effect:.3f} on average, "
                       f"more than blanking the centre ({centre_effect:.3f})")
    if heat_in_border > uniform + 0.1:
        reasons.append(f"{heat_in_border:.0%} of the heat map lies in the outer "
                       f"{BORDER_FRACTION:.0%} border (an even spread would put "
                       f"{uniform:.0%} there)")
    lungs, lung_words = {}, ""
    found = [i for i, m in enumerate(lung_masks or []) if m is not None]
    if found:
        masks = np.stack([lung_masks[i] for i in found])
        in_lungs = heat_shares(cams[found], masks)
        area = float(masks.mean())
        delta_lungs, delta_rest = blanked(masks, found), blanked(~masks, found)
        all_shares = np.full(len(images), np.nan)
        all_shares[found] = in_lungs
        lungs = {"lungs_found": len(found), "lung_heat_share": group_means(all_shares, labels),
                 "lung_heat_share_per_source": group_means(all_shares, sources)
                 if sources is not None else None,
                 "lung_area_share": area,
                 "occlusion_lungs": group_means(_fill(len(images), found, delta_lungs), labels),
                 "occlusion_outside_lungs": group_means(_fill(len(images), found, delta_rest),
                                                   labels)}
        lung_effect, rest_effect = float(delta_lungs.mean()), float(delta_rest.mean())
        heat_share = float(in_lungs.mean())
        if rest_effect > lung_effect:
            reasons.append(f"blanking everything outside the lungs changes P(COVID) by "
                           f"{rest_effect:.3f} on average, more than blanking the lungs "
                           f"({lung_effect:.3f})")
        if heat_share < area:
            reasons.append(f"only {heat_share:.0%} of the heat map lies inside the lungs, less "
                           f"than an even spread would put there ({area:.0%}, their area)")
        lung_words = (f"; {heat_share:.0%} of the heat lies inside the lungs found on "
                      f"{len(found)} of {len(images)} images (they cover {area:.0%} of it), "
                      f"and blanking them changes P(COVID) by {lung_effect:.3f} against "
                      f"{rest_effect:.3f} for everything else")
    if reasons:
        verdict = ("WARNING: the model appears to decide from outside the lungs (the border, "
                   "where text, markers and labels sit, or the rest of the film) rather than "
                   "from the lungs: " + "; ".join(reasons)
                   + ". Its scores may reflect where an image came from, not the disease.")
    else:
        verdict = (f"The model relies more on the centre than on the border: blanking the centre "
                   f"changes P(COVID) by {centre_effect:.3f}, the border by {border_effect:.3f}; "
                   f"{heat_in_border:.0%} of the heat map lies in the border{lung_words}. "
                   "That does not show it learned the disease: a source can also be recognised "
                   "from cues spread over the whole film (exposure, grain, sharpness), which only "
                   "images from a hospital it never saw reveal ('covidxray crossval --by "
                   "source').")
    return ShortcutCheck(group_means(share, labels), uniform, group_means(delta_border, labels),
                         group_means(delta_centre, labels), bool(reasons), verdict, **lungs)


def _fill(n: int, found: list[int], values: np.ndarray) -> np.ndarray:
    out = np.full(n, np.nan)
    out[found] = values
    return out


@dataclass
class Explanation:
    """One image's Grad-CAM: ``heatmap`` is at the original image's resolution, in [0, 1]."""

    path: str
    probability: float
    label: str
    heatmap: np.ndarray
    overlay: np.ndarray  # RGB uint8, same size as the image, with the lungs found outlined
    ood: bool | None = None  # the gate's verdict: a heat map of an unfamiliar image means little
    ood_reason: str | None = None
    lung_heat_share: float | None = None  # of the heat, inside the lungs found (None: none)


def explain_image(predictor, source, alpha: float = 0.4) -> Explanation:
    """Grad-CAM of one input (a path, bytes or an array) with a loaded ``Predictor``; raises
    ``ImageReadError``."""
    prediction = predictor.predict(source, heatmap=True)
    if prediction.error:
        raise ImageReadError(prediction.path, prediction.error)
    return explanation_of(prediction, alpha)


def explanation_of(prediction, alpha: float = 0.4) -> Explanation:
    """The ``Explanation`` of a ``Prediction`` made with its heat map."""
    outline = prediction.lungs.outline(prediction.image.shape) \
        if prediction.lungs_found else None
    return Explanation(prediction.path, prediction.probability, prediction.label,
                       prediction.heatmap, overlay(prediction.image, prediction.heatmap, alpha,
                                                   outline=outline),
                       prediction.ood, prediction.ood_reason, prediction.lung_heat_share)


def save_png(path, rgb: np.ndarray) -> None:
    from covidxray.fileutil import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
