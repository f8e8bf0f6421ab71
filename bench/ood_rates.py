"""Flag rates of a run's out-of-distribution gate per kind of input.

    python bench/ood_rates.py RUN [--n 40] [--refit] [--sheet drawn.png]
        [--not-frontal ../shared/data/not-frontal]

Kinds: held-out X-rays (the run's test split: should stay low), natural photographs
(scikit-image's sample images, in colour), synthetic non-X-ray pictures (noise, gradients,
shapes, documents and screenshots with text), CT-like axial slices and lateral-like chest views
drawn here with random pose, exposure, blur and noise, and, with ``--not-frontal``, the real
lateral chest X-rays and CT images of that folder (its ``manifest.csv`` names each file's
kind). Every image is written to a PNG file and goes through ``Predictor.predict_paths``, the
path of ``covidxray predict``. Prints one table with the share each test of the gate flags
(colour, layout, features, lungs; an image can fail several); ``--refit`` first fits the run's
gate again from its own split (runs of older versions).
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
        if image.ndim == 3 and image.shape[-1] not in (3, 4):
            image = image[0]  # a stack of planes: the first
        image = image[..., :3] if image.ndim == 3 else image  # colour is kept: it is a cue
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


def _jitter(rng, image: np.ndarray) -> np.ndarray:
    """Pose, exposure, blur and noise, so each drawn image differs like real acquisitions do."""
    from scipy.ndimage import affine_transform
    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.85, 1.15)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    centre = np.array(image.shape) / 2
    offset = centre - matrix @ centre + rng.uniform(-0.08, 0.08, 2) * image.shape[0]
    image = affine_transform(image, matrix, offset=offset, order=1, cval=float(image.min()))
    image = gaussian_filter(image, rng.uniform(0.5, 2.0))
    image = np.clip(image + rng.normal(0, rng.uniform(0.005, 0.04), image.shape), 0, 1)
    return (image ** rng.uniform(0.6, 1.6)).astype(np.float32)


def ct_like(rng, n: int, size: int = 256) -> list[np.ndarray]:
    """Axial chest CT-like slices: an oval body on black, two dark lungs with vessels, spine,
    heart and the scanner table, in lung or soft-tissue windows."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    out = []
    for _ in range(n):
        body = ((x / rng.uniform(0.75, 0.95)) ** 2 + (y / rng.uniform(0.5, 0.72)) ** 2) <= 1
        tissue = rng.uniform(0.4, 0.7)
        image = np.where(body, tissue, 0.0)
        lung_value = rng.uniform(0.03, 0.25)
        for side in (-1, 1):
            lung = (((x - side * rng.uniform(0.32, 0.42)) / rng.uniform(0.24, 0.33)) ** 2
                    + ((y + 0.05) / rng.uniform(0.35, 0.5)) ** 2) <= 1
            vessels = (_smooth(rng, size, 1.5) > rng.uniform(0.7, 0.8)) * 0.3
            image = np.where(lung & body, lung_value + vessels, image)
        image = np.where((x / 0.11) ** 2 + ((y - 0.45) / 0.1) ** 2 <= 1, 0.95, image)  # vertebra
        image = np.where(((x - 0.05) / 0.2) ** 2 + ((y - 0.05) / 0.2) ** 2 <= 1,
                         tissue + 0.08, image)  # heart
        if rng.random() < 0.7:
            image = np.where(np.abs(y - rng.uniform(0.75, 0.9)) < 0.02, 0.4, image)  # table
        out.append(_jitter(rng, image))
    return out


def lateral_like(rng, n: int, size: int = 256) -> list[np.ndarray]:
    """Lateral chest views: one wide lung field, spine along the back, sternum and heart in front,
    arms raised over the top, facing either way."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    out = []
    for _ in range(n):
        width = rng.uniform(0.6, 0.85)
        body = ((x / width) ** 2 + (y / 1.05) ** 2) <= 1
        image = rng.uniform(0.0, 0.15) + rng.uniform(0.25, 0.45) * body
        lung = ((x + 0.05) / (width * 0.7)) ** 2 + ((y + 0.05) / rng.uniform(0.6, 0.8)) ** 2 <= 1
        image = image - rng.uniform(0.1, 0.25) * gaussian_filter(lung.astype(float), 4)
        spine = np.abs(x - (width * 0.72 + 0.05 * y)) < 0.07
        image += 0.35 * gaussian_filter(spine.astype(float), 2)
        image += 0.3 * gaussian_filter((((x + 0.3) / 0.3) ** 2 + ((y - 0.35) / 0.3) ** 2
                                        <= 1).astype(float), 6)  # heart, anterior
        image += 0.25 * ((y > rng.uniform(0.45, 0.65) - 0.2 * x) & body)  # diaphragm, sloping
        if rng.random() < 0.6:  # arms raised over the head: bright bands at the top
            image += 0.3 * gaussian_filter(((y < -0.6) & (np.abs(x) < 0.5)).astype(float), 8)
        image = np.clip(image, 0, 1)
        out.append(_jitter(rng, image[:, ::-1] if rng.random() < 0.5 else image))
    return out


def write_pngs(folder: Path, images) -> list[str]:
    """Save drawn images as files, so the measurement goes through the product's own path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8)).save(
            path)
        paths.append(str(path))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--n", type=int, default=40, help="images per drawn kind")
    parser.add_argument("--refit", action="store_true",
                        help="fit the run's gate again from its split first (older runs)")
    parser.add_argument("--sheet", help="write a contact sheet of the drawn images here")
    parser.add_argument("--not-frontal", metavar="DIR",
                        help="a folder of real non-frontal images with a manifest.csv "
                             "(file, kind): each kind is measured")
    args = parser.parse_args(argv)

    import tempfile
    from covidxray.run.folder import RunFolder
    from covidxray.run.predictor import Predictor
    from covidxray.training.finalize import refit_ood_gate

    if args.refit:
        refit_ood_gate(args.run)
        print(f"fitted the gate of {args.run} again from its split")
    predictor = Predictor.load(args.run)
    if predictor.gate is None:
        raise SystemExit(f"{args.run} has no out-of-distribution gate: use --refit")
    records = RunFolder(args.run).read_split(predictor.positive_class)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as scratch:
        drawn = {
            "natural photographs (scikit-image)": list(natural_images().values()),
            "synthetic non-X-ray (noise, shapes, text)": synthetic_non_xray(rng, args.n),
            "CT-like axial slices": ct_like(rng, args.n),
            "lateral-like chest views": lateral_like(rng, args.n),
        }
        kinds = {"held-out X-rays (test split)": [r.path for r in records if r.split == "test"]}
        for i, (kind, images) in enumerate(drawn.items()):
            kinds[kind] = write_pngs(Path(scratch) / str(i), images)
        if args.not_frontal:
            import csv
            with open(Path(args.not_frontal) / "manifest.csv", newline="") as handle:
                for row in csv.DictReader(handle):
                    kinds.setdefault(f"real {row['kind'].lower()} images ({args.not_frontal})",
                                     []).append(str(Path(args.not_frontal) / row["file"]))
        if args.sheet:
            from covidxray.pixels.preprocess import load_for_model
            rows = [np.concatenate([load_for_model(p, 96) for p in paths[:10]], axis=1)
                    for paths in list(kinds.values())[1:]]
            Image.fromarray(np.concatenate(rows)).save(args.sheet)
        print(f"run {args.run} ({predictor.metadata.backbone}, {predictor.image_size} px)")
        tests = {"colour": "colour image", "layout": "layout", "features": "features",
                 "lungs": "no plausible lungs"}
        print("| input | images | flagged | rate | " + " | ".join(tests) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(tests))
        for kind, paths in kinds.items():
            results = [p for p in predictor.predict_paths(paths) if not p.error]
            flags = [bool(p.ood) for p in results]
            by_test = [np.mean([name in (p.ood_reason or "") for p in results])
                       for name in tests.values()]
            print(f"| {kind} | {len(flags)} | {sum(flags)} | {np.mean(flags):.1%} | "
                  + " | ".join(f"{rate:.1%}" for rate in by_test) + " |", flush=True)


if __name__ == "__main__":
    main()
