"""Score the fold runs of a finished ``covidxray crossval`` with K test-time views, through the
product's own code: ``Predictor.predict_prepared`` with the run's ``test_time_views`` set to K,
the threshold chosen again on the validation scores (Youden's J), as training does. Training is
deterministic, so this equals retraining the arm with ``--test-time-views K``.

    python bench/tta_views.py cv/norm 0,6,16
    python bench/tta_views.py cv/norm 6,16 --per-image   # views drawn per image, not shared
"""

from __future__ import annotations

import argparse
import json
import zlib
from pathlib import Path

import numpy as np

import covidxray  # noqa: F401  (sets the Keras backend before keras is imported)
import covidxray.transforms as transforms
from covidxray.data import load_images
from covidxray.metrics import binary_metrics, choose_threshold
from covidxray.run import Predictor
from covidxray.split import read_split_records


def per_image_view(images, view, seed=0, augment=None):
    """The variant: each image's view seeded by its pixels, so images get different draws."""
    augment = augment or transforms.SourceAugment()
    return np.stack([transforms.augment_prepared(
        image, augment, np.random.default_rng((seed, view, zlib.crc32(image.tobytes()))))
        for image in images]).reshape(images.shape)


def main(argv=None) -> None:
    from sklearn.metrics import roc_auc_score
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crossval_dir")
    parser.add_argument("views", help="comma-separated K values, e.g. 0,6,16")
    parser.add_argument("--per-image", action="store_true")
    args = parser.parse_args(argv)
    if args.per_image:
        transforms.source_cue_view = per_image_view
    result = json.loads((Path(args.crossval_dir) / "crossval.json").read_text())
    rows = result["folds"] + ([result["random_split"]] if "random_split" in result else [])
    for row in rows:
        predictor = Predictor.load(row["run"])
        records = read_split_records(Path(row["run"]) / "split.csv", predictor.positive_class)
        data = {s: load_images([r for r in records if r.split == s], predictor.preprocessing)
                for s in ("val", "test")}
        cells = []
        for k in [int(v) for v in args.views.split(",")]:
            predictor.metadata["test_time_views"] = k
            val = predictor.predict_prepared(data["val"].images)
            test = predictor.predict_prepared(data["test"].images)
            y = data["test"].targets
            if 0 < y.sum() < len(y):
                value = roc_auc_score(y, test)
            else:
                threshold = choose_threshold(data["val"].targets, val)
                rate = "sensitivity" if y.sum() else "specificity"  # the class it has
                value = binary_metrics(y, test, threshold)[rate]
            cells.append(f"K={k}: {value:.3f}")
        print(row["fold"], " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
