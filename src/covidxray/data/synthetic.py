"""Radiograph-like synthetic chest images, for the demo and the tests.

They have a thorax, two lung fields, ribs, clavicles, spine, mediastinum and heart, and
diaphragm domes. Positive cases add what COVID-19 pneumonia typically shows on a frontal film:
bilateral, peripheral, lower-zone hazy (ground-glass) opacities. They teach the pipeline, not
medicine: every data set written here is marked synthetic, and so is every output made from it.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from covidxray.data.dataset import SYNTHETIC_MARKER


def _ellipse(x, y, cx, cy, rx, ry):
    return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0


def _soft(mask: np.ndarray, radius: float) -> np.ndarray:
    return gaussian_filter(mask.astype(np.float32), radius)


def synthetic_radiograph(rng: np.random.Generator, size: int = 256,
                         covid: bool = False, with_lungs: bool = False):
    """One frontal chest radiograph-like image, float32 in [0, 1], bone and tissue bright;
    ``with_lungs``: and its lung fields, a boolean mask (the image, the mask)."""
    y, x = np.mgrid[-1:1:size * 1j, -1:1:size * 1j].astype(np.float32)
    # patients differ in size, position and tilt
    angle = np.deg2rad(rng.uniform(-6, 6))
    x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
    x = x / rng.uniform(0.8, 1.08) + rng.uniform(-0.1, 0.1)
    y = y / rng.uniform(0.8, 1.08) + rng.uniform(-0.1, 0.1)
    edge = size / 90
    image = 0.06 + 0.30 * _soft(_ellipse(x, y, 0, 0.1, 0.88, 1.1), 3 * edge)  # soft tissue
    lung_rx, lung_ry = rng.uniform(0.26, 0.31), rng.uniform(0.5, 0.6)
    lungs = [_ellipse(x, y, side * 0.4, -0.05, lung_rx, lung_ry) for side in (-1, 1)]
    lung_field = _soft(lungs[0] | lungs[1], 2 * edge)
    image -= 0.22 * lung_field
    for k in range(9):  # posterior ribs: arcs across each lung field
        level = -0.62 + 0.15 * k
        arc = np.abs(y - (level - 0.5 * (np.abs(x) - 0.45) ** 2 + 0.15 * np.abs(x)))
        image += 0.05 * _soft((arc < 0.02) & (np.abs(x) < 0.78), edge) * (0.4 + lung_field)
    for side in (-1, 1):  # clavicles
        band = np.abs(y - (-0.66 + 0.18 * side * x)) < 0.03
        image += 0.18 * _soft(band & (side * x > 0.05) & (side * x < 0.6), edge)
    image += 0.12 * _soft(np.abs(x) < 0.06, edge)  # spine
    heart = _ellipse(x, y, 0.1, 0.25, rng.uniform(0.22, 0.3), 0.3)
    image += 0.30 * _soft(heart | _ellipse(x, y, 0, -0.3, 0.12, 0.45), 2 * edge)  # mediastinum
    image += 0.25 * _soft((y > 0.5 + 0.12 * x ** 2) & (np.abs(x) < 0.85), 3 * edge)  # diaphragm
    if covid:
        opacity = np.zeros_like(image)
        for side in (-1, 1):  # bilateral
            for _ in range(rng.integers(2, 5)):
                cx = side * rng.uniform(0.5, 0.66)  # peripheral
                cy = rng.uniform(0.05, 0.45)  # lower zones
                sigma = rng.uniform(0.08, 0.16)
                opacity += rng.uniform(0.5, 1.0) * np.exp(
                    -((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma ** 2))
        image += rng.uniform(0.10, 0.18) * np.clip(opacity, 0, 1.2) * lung_field
    # exposure and soft-tissue differences: a smooth random field across the film
    image += 0.12 * (_soft(rng.random(image.shape), 12 * edge) - 0.5) * 8
    image = _soft(image, rng.uniform(0.3, 1.0) * edge / 2)
    image = np.clip(image, 0, None) ** rng.uniform(0.85, 1.15) \
        + rng.normal(0, 0.015, image.shape)
    image = np.clip(image, 0, 1).astype(np.float32)
    return (image, lungs[0] | lungs[1]) if with_lungs else image


def make_synthetic_lung_masks(out: str | Path, n: int = 40, size: int = 128,
                              seed: int = 0) -> Path:
    """A lung-segmentation folder of synthetic radiographs: ``images/``, ``masks/`` (0/255,
    same names) and ``manifest.csv`` (file, mask, patient_id), marked synthetic."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        image, lungs = synthetic_radiograph(rng, size, covid=bool(i % 2), with_lungs=True)
        name = f"synthetic_{i:04d}.png"
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(out / "images" / name)
        Image.fromarray(lungs.astype(np.uint8) * 255).save(out / "masks" / name)
        rows.append({"file": f"images/{name}", "mask": f"masks/{name}", "patient_id": str(i)})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "mask", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    (out / SYNTHETIC_MARKER).write_text("Synthetic radiograph-like images and their lung "
                                        "fields, made by covidxray.data.synthetic.\n")
    return out


def make_synthetic_dataset(out: str | Path, n_per_class: int = 60, size: int = 128,
                           seed: int = 0, images_per_patient: int = 2) -> Path:
    """Write ``COVID/`` and ``NON-COVID/`` PNGs, a ``manifest.csv`` with patient ids, and the
    synthetic marker. Returns the folder."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    for label, covid in (("COVID", True), ("NON-COVID", False)):
        (out / label).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            patient = f"{label.lower()}-{i // images_per_patient:04d}"
            name = f"synthetic_{label.lower()}_{i:04d}.png"
            pixels = synthetic_radiograph(rng, size, covid)
            Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(out / label / name)
            rows.append({"file": f"{label}/{name}", "label": label, "patient_id": patient,
                         "source": "synthetic"})
    with open(out / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["file", "label", "patient_id", "source"])
        writer.writeheader()
        writer.writerows(rows)
    (out / SYNTHETIC_MARKER).write_text(
        "Synthetic radiograph-like images made by covidxray.data.synthetic for demonstration and "
        "testing. Not real X-rays; no result on them says anything about real patients.\n")
    return out


def reference_films(out: str | Path) -> dict[str, Path]:
    """Fixed drawn films as PNG files in ``out``, the same bytes on every machine: two frontal
    radiograph-like films (the second with COVID-like opacities) and a drawing that is no chest
    film at all. A ready model's card records its outputs on them (and a test checks them), so
    that a change to decoding, grey levels, crop or weights that moves a prediction shows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:1:256j, 0:1:320j]
    films = {"drawn-frontal": synthetic_radiograph(np.random.default_rng(11), 320),
             "drawn-frontal-opacities": synthetic_radiograph(np.random.default_rng(12), 320,
                                                             covid=True),
             # a bright disc on a ramp: no lungs, no thorax
             "drawn-not-a-chest": np.clip(0.15 + 0.5 * x + 0.4 * (
                 (x - 0.6) ** 2 + (y - 0.45) ** 2 < 0.04), 0, 1)}
    paths = {}
    for name, pixels in films.items():
        paths[name] = out / f"{name}.png"
        Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(paths[name])
    return paths
