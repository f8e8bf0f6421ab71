"""Why the model decided: Grad-CAM heat maps, overlays, and the border-shortcut check.

Grad-CAM weights each channel k of the last convolutional stage by the mean gradient of the
class score (the logit z, before the sigmoid, as in Selvaraju et al.; the probability's gradient
vanishes once the model is confident) over the map, alpha_k = mean_ij dz/dF_k(i, j), and keeps
ReLU(sum_k alpha_k F_k). Our head is global average pooling -> dropout -> one sigmoid unit, so
that gradient is exactly w_k / (h * w): Grad-CAM reduces to the class activation map of Zhou et
al. (2016). Computing it in closed form needs no backend's autograd, so it runs the same on
torch, jax and tensorflow (a test checks it against torch's autograd).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
from PIL import Image

from covidxray.model import forward, predict_scores

BORDER_FRACTION = 0.15  # outer 15% on each side: where text, markers and labels sit


def gradcam(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (n, h, w) of the last convolutional stage for P(positive), each scaled to
    [0, 1] (all zero where nothing speaks for the positive class)."""
    return cams_from_logit_maps(forward(model, np.asarray(images), batch_size, maps=True)
                                .logit_maps)


def cams_from_logit_maps(logit_maps: np.ndarray) -> np.ndarray:
    """ReLU of each location's logit term, scaled to [0, 1] per image: Grad-CAM in closed form."""
    cams = np.maximum(logit_maps, 0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def upsample(heatmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A heat map resized (bilinear) to an image of ``shape`` (rows, columns)."""
    image = Image.fromarray(heatmap.astype(np.float32), mode="F")
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def overlay(gray: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            colormap: str = "jet") -> np.ndarray:
    """RGB uint8: the grayscale image (in [0, 1]) with the colour-mapped heat map blended in,
    more strongly where the heat is higher."""
    from matplotlib import colormaps
    heat = upsample(heatmap, gray.shape) if heatmap.shape != gray.shape else heatmap
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


def shortcut_check(model: keras.Model, images: np.ndarray, labels: list[str],
                   batch_size: int = 32) -> ShortcutCheck:
    """Grad-CAM border share and occlusion of border vs centre, per class.

    Flagged when blanking the border changes P(COVID) more than blanking the centre, or when
    the Grad-CAM mass in the border clearly exceeds what an even spread would put there.
    """
    images = np.asarray(images)
    size = images.shape[1]
    border = border_mask(size)
    # heat share measured on the maps upsampled to the image, as they are shown
    cams = np.stack([upsample(cam, (size, size)) for cam in gradcam(model, images, batch_size)])
    mass = cams.sum(axis=(1, 2))
    share = np.divide((cams * border).sum(axis=(1, 2)), mass, out=np.zeros_like(mass),
                      where=mass > 0)
    fill = images.reshape(len(images), -1).mean(axis=1)[:, None, None]
    no_border = np.where(border, fill, images).astype(images.dtype)
    no_centre = np.where(border, images, fill).astype(images.dtype)
    base = predict_scores(model, images, batch_size)
    delta_border = np.abs(predict_scores(model, no_border, batch_size) - base)
    delta_centre = np.abs(predict_scores(model, no_centre, batch_size) - base)
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


def explain_image(predictor, path: str, alpha: float = 0.4) -> Explanation:
    """Grad-CAM of one file with a loaded ``Predictor``; raises ``ImageReadError``."""
    from covidxray.imageio import decode, prepare
    decoded = decode(path)
    prepared = prepare(decoded.gray, predictor.preprocessing)[None]
    (prediction,), cams = predictor.analyse(prepared, [str(path)], [decoded.colourfulness])
    heatmap = upsample(cams[0], decoded.gray.shape)
    return Explanation(str(path), prediction.probability, prediction.label, heatmap,
                       overlay(decoded.gray, heatmap, alpha), prediction.ood,
                       prediction.ood_reason)


def save_png(path, rgb: np.ndarray) -> None:
    from covidxray.fileutil import atomic_path
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")
