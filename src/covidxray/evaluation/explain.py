"""Why the model decided: Grad-CAM overlays, and the border-shortcut check.

The heat maps come from the run's ``Predictor`` (Grad-CAM in closed form,
``covidxray.model.network.cams_from_logit_maps``), on each input's own pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from covidxray.pixels.imageio import ImageReadError
from covidxray.pixels.transforms import resize

BORDER_FRACTION = 0.15  # outer 15% on each side: where text, markers and labels sit


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: str = "jet") -> np.ndarray:
    """RGB uint8: the grayscale image (in [0, 1]) with the colour-mapped heat map blended in,
    more strongly where the heat is higher."""
    from matplotlib import colormaps
    heat = resize(heatmap, gray.shape) if heatmap.shape != gray.shape else heatmap
    colours = colormaps[colormap](np.clip(heat, 0, 1))[..., :3]
    weight = alpha * np.clip(heat, 0, 1)[..., None]
    blended = (1 - weight) * np.asarray(gray)[..., None] + weight * colours
    return np.clip(np.rint(blended * 255), 0, 255).astype(np.uint8)


def border_mask(size: int, fraction: float = BORDER_FRACTION) -> np.ndarray:
    """True on the outer ``fraction`` of each side of a size x size image."""
    edge = int(round(size * fraction))
    mask = np.ones((size, size), bool)
    mask[edge:size - edge, edge:size - edge] = False
    return mask


@dataclass
class ShortcutCheck:
    """Does the model look at the border (markers, text) or at the centre (lungs)?"""

    border_share: dict  # per class: mean share of Grad-CAM mass in the border
    uniform_border_share: float  # what a heat map spread evenly would give
    occlusion_border: dict  # per class: mean |change in P| when the border is blanked
    occlusion_centre: dict  # per class: the same when the centre is blanked
    flagged: bool
    verdict: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def shortcut_check(predictor, images: np.ndarray, labels: list[str],
                   batch_size: int = 32) -> ShortcutCheck:
    """Grad-CAM border share and occlusion of border vs centre, per class, on a run's model
    inputs ((n, size, size) uint8, as its ``Predictor`` prepares them).

    Flagged when blanking the border changes P(COVID) more than blanking the centre, or when
    the Grad-CAM mass in the border clearly exceeds what an even spread would put there.
    """
    images = np.asarray(images)
    size = images.shape[1]
    border = border_mask(size)
    # heat share measured on the maps upsampled to the image, as they are shown
    cams = np.stack([resize(cam, (size, size))
                     for cam in predictor.heatmaps_prepared(images, batch_size)])
    mass = cams.sum(axis=(1, 2))
    share = np.divide((cams * border).sum(axis=(1, 2)), mass, out=np.zeros_like(mass),
                      where=mass > 0)
    fill = images.reshape(len(images), -1).mean(axis=1)[:, None, None]
    no_border = np.where(border, fill, images).astype(images.dtype)
    no_centre = np.where(border, images, fill).astype(images.dtype)
    def score(x):  # each image alone: the views would only blur the occlusion
        return predictor.predict_prepared(x, batch_size, test_time_views=0)

    base = score(images)
    delta_border = np.abs(score(no_border) - base)
    delta_centre = np.abs(score(no_centre) - base)
    labels = np.asarray(labels)
    per_class = lambda values: {c: float(values[labels == c].mean()) for c in sorted(set(labels))}
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
    if reasons:
        verdict = ("WARNING: the model appears to decide from the image border, where text, "
                   "markers and labels sit, rather than from the lungs: " + "; ".join(reasons)
                   + ". Its scores may reflect where an image came from, not the disease.")
    else:
        verdict = (f"The model relies more on the centre than on the border: blanking the centre "
                   f"changes P(COVID) by {centre_effect:.3f}, the border by {border_effect:.3f}; "
                   f"{heat_in_border:.0%} of the heat map lies in the border. That does not "
                   "show it learned the disease: a source can also be recognised from cues "
                   "spread over the whole film (exposure, grain, sharpness), which only images "
                   "from a hospital it never saw reveal ('covidxray crossval --by source').")
    return ShortcutCheck(per_class(share), uniform, per_class(delta_border),
                         per_class(delta_centre), bool(reasons), verdict)


@dataclass
class Explanation:
    """One image's Grad-CAM: ``heatmap`` is at the original image's resolution, in [0, 1]."""

    path: str
    probability: float
    label: str
    heatmap: np.ndarray
    overlay: np.ndarray  # RGB uint8, same size as the image
    ood: bool | None = None  # the gate's verdict: a heat map of an unfamiliar image means little
    ood_reason: str | None = None


def explain_image(predictor, source, alpha: float = 0.4) -> Explanation:
    """Grad-CAM of one input (a path, bytes or an array) with a loaded ``Predictor``; raises
    ``ImageReadError``."""
    prediction = predictor.predict(source, heatmap=True)
    if prediction.error:
        raise ImageReadError(prediction.path, prediction.error)
    return explanation_of(prediction, alpha)


def explanation_of(prediction, alpha: float = 0.4) -> Explanation:
    """The ``Explanation`` of a ``Prediction`` made with its heat map."""
    return Explanation(prediction.path, prediction.probability, prediction.label,
                       prediction.heatmap, overlay(prediction.image, prediction.heatmap, alpha),
                       prediction.ood, prediction.ood_reason)


def save_png(path, rgb: np.ndarray) -> None:
    from covidxray.fileutil import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
