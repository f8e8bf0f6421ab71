"""Flag rates of a run's out-of-distribution gate per kind of input.

    python bench/ood_rates.py RUN [--n 40]

Kinds: held-out X-rays (the run's test split: should stay low), natural photographs
(scikit-image's sample images), synthetic non-X-ray pictures (noise, gradients, shapes,
documents and screenshots with text), CT-like axial slices and lateral-like chest views drawn
here. Prints one table; a run without a gate gets one fitted from its own split first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter


def natural_images() -> dict[str, np.ndarray]:
    from skimage import data
    images = {}
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page",
                 "text", "horse", "clock", "immunohistochemistry", "hubble_deep_field",
                 "retina", "brick", "grass", "gravel", "colorwheel", "logo", "motorcycle_left",
                 "cat", "binary_blobs", "checkerboard", "microaneurysms", "eagle", "lily",
                 "cell", "human_mitosis", "stereo_motorcycle", "skin"):
        try:
            image = getattr(data, name)()
        except Exception:  # not shipped with the package (needs a download): left out
            continue
        image = image[0] if isinstance(image, tuple) else image
        image = np.asarray(image, dtype=np.float64)
        if image.ndim == 3:
            image = image[..., :3].mean(-1) if image.shape[-1] in (3, 4) else image[0]
        image = (image - image.min()) / max(np.ptp(image), 1e-9)
        images[name] = image.astype(np.float32)
    return images


def _smooth(rng, size, sigma):
    field = gaussian_filter(rng.random((size, size)), sigma)
    return (field - field.min()) / max(np.ptp(field), 1e-9)


def synthetic_non_xray(rng, n: int, size: int = 256) -> list[np.ndarray]:
    out = []
    y, x = np.mgrid[0:1:size * 1j, 0:1:size * 1j]
    for i in range(n):
        kind = i % 5
        if kind == 0:
            image = rng.random((size, size))  # noise
        elif kind == 1:
            image = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) % 1  # gradients
        elif kind == 2:
            image = _smooth(rng, size, rng.uniform(2, 20))  # blobs
        else:  # a document (3) or a dark-themed screenshot (4) with text lines and boxes
            background, ink = (255, 20) if kind == 3 else (30, 220)
            canvas = Image.new("L", (size, size), background)
            draw = ImageDraw.Draw(canvas)
            for line in range(rng.integers(8, 20)):
                draw.text((10, 8 + 12 * line), "lorem ipsum dolor sit amet 12.5 mg"[
                    : rng.integers(10, 34)], fill=ink)
            if kind == 4:
                draw.rectangle([size // 2, size // 3, size - 10, size - 10], outline=ink)
            image = np.asarray(canvas) / 255.0
        out.append(image.astype(np.float32))
    return out


def ct_like(rng, n: int, size: int = 256) -> list[np.ndarray]:
    """Axial chest CT-like slices: an oval body on black, two dark lungs, spine, heart."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    out = []
    for _ in range(n):
        body = ((x / rng.uniform(0.8, 0.95)) ** 2 + (y / rng.uniform(0.55, 0.7)) ** 2) <= 1
        image = np.where(body, 0.55, 0.0)
        for side in (-1, 1):
            lung = ((x - side * 0.38) / 0.3) ** 2 + ((y + 0.05) / 0.45) ** 2 <= 1
            image = np.where(lung & body, 0.08 + 0.05 * _smooth(rng, size, 3), image)
        image = np.where((x / 0.12) ** 2 + ((y - 0.45) / 0.1) ** 2 <= 1, 0.95, image)  # vertebra
        image = np.where(((x - 0.05) / 0.22) ** 2 + ((y - 0.05) / 0.2) ** 2 <= 1, 0.62, image)
        image = np.where(np.abs(y - 0.8) < 0.02, 0.4, image)  # scanner table
        out.append(np.clip(gaussian_filter(image, 1.5) + rng.normal(0, 0.02, image.shape),
                           0, 1).astype(np.float32))
    return out


def lateral_like(rng, n: int, size: int = 256) -> list[np.ndarray]:
    """Lateral chest views: one wide lung field, spine along the back, sternum in front."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    out = []
    for _ in range(n):
        body = ((x / 0.75) ** 2 + (y / 1.05) ** 2) <= 1
        image = 0.05 + 0.35 * body
        lung = ((x + 0.05) / 0.55) ** 2 + ((y + 0.05) / 0.7) ** 2 <= 1
        image = image - 0.2 * gaussian_filter(lung.astype(float), 4)
        spine = np.abs(x - (0.55 + 0.05 * y)) < 0.08
        image += 0.35 * gaussian_filter(spine.astype(float), 2)
        image += 0.3 * gaussian_filter((((x + 0.3) / 0.3) ** 2 + ((y - 0.35) / 0.3) ** 2
                                        <= 1).astype(float), 6)  # heart, anterior
        image += 0.25 * ((y > 0.55 - 0.2 * x) & body)  # diaphragm, sloping
        out.append(np.clip(gaussian_filter(image, rng.uniform(1, 2)), 0, 1).astype(np.float32))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=40, help="images per drawn kind")
    args = parser.parse_args(argv)

    from covidxray.imageio import load_for_model, prepare
    from covidxray.model import embed_and_score
    from covidxray.run import Predictor
    from covidxray.split import read_split_records

    predictor = Predictor.load(args.run)
    records = read_split_records(Path(args.run) / "split.csv",
                                 predictor.metadata["positive_class"])
    if predictor.gate is None:
        from covidxray.data import load_images
        from covidxray.ood import OOD_FILE
        from covidxray.training import fit_ood_gate
        split = {s: load_images([r for r in records if r.split == s], predictor.image_size)
                 for s in ("train", "val")}
        predictor.gate = fit_ood_gate(predictor.model, split["train"], split["val"], 32)
        predictor.gate.save(Path(args.run) / OOD_FILE)
        print(f"fitted a gate for this run from its training split: {OOD_FILE}")
    rng = np.random.default_rng(0)
    size = predictor.image_size
    kinds = {
        "held-out X-rays (test split)": np.stack([load_for_model(r.path, size) for r in records
                                                  if r.split == "test"]),
        "natural photographs (scikit-image)": np.stack([prepare(i, size) for i in
                                                        natural_images().values()]),
        "synthetic non-X-ray (noise, shapes, text)": np.stack(
            [prepare(i, size) for i in synthetic_non_xray(rng, args.n)]),
        "CT-like axial slices": np.stack([prepare(i, size) for i in ct_like(rng, args.n)]),
        "lateral-like chest views": np.stack([prepare(i, size)
                                              for i in lateral_like(rng, args.n)]),
    }
    print(f"run {args.run} ({predictor.metadata['backbone']}, {size} px)")
    print(f"{'input':<44}{'images':>7}{'flagged':>9}{'rate':>8}")
    for kind, images in kinds.items():
        embeddings, _ = embed_and_score(predictor.model, images)
        flags = [v.ood for v in predictor.gate.check(embeddings, images)]
        print(f"{kind:<44}{len(flags):>7}{sum(flags):>9}{np.mean(flags):>8.1%}")


if __name__ == "__main__":
    main()
