"""Score finished ``covidxray crossval`` arms again, fold by fold, through the product's own
``Predictor`` (each run's preprocessing and test-time views): one arm with another number of
test-time views, or an ensemble of arms (the mean P(COVID) of their fold runs).

A rate at a threshold (a single-class held-out source) uses the threshold chosen on the mean
validation scores (Youden's J, as training does). Arms trained with other seeds have other
validation splits, so for them only the held-out sources with both classes are scored (their
test set is the same source whatever the seed), and not the random split.

    python bench/ensemble_folds.py cv/default cv/default-s1 cv/default-s2
    python bench/ensemble_folds.py cv/norm --views 16   # training is deterministic: this
                                                       # equals retraining with 16 views
    python bench/ensemble_folds.py cv/norm --views 6 --per-image   # views drawn per image
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


def score_run(run: str, views: int | None = None) -> dict:
    """split -> (paths, targets, sources, scores) of a fold run's validation and test images,
    with ``views`` test-time views instead of the run's own number where given."""
    predictor = Predictor.load(run)
    if views is not None:
        predictor.metadata["test_time_views"] = views
    records = read_split_records(Path(run) / "split.csv", predictor.positive_class)
    scored = {}
    for split in ("val", "test"):
        loaded = load_images([r for r in records if r.split == split], predictor.preprocessing)
        scored[split] = ([r.path for r in loaded.records],
                         np.array([r.target for r in loaded.records]),
                         np.array([r.source for r in loaded.records]),
                         predictor.predict_prepared(loaded.images))
    return scored


def fold_value(targets, scores, val_targets=None, val_scores=None):
    """ROC-AUC where the test set has both classes, else the rate of its one class at the
    threshold chosen on the validation scores (None without them)."""
    from sklearn.metrics import roc_auc_score
    if 0 < targets.sum() < len(targets):
        return "roc_auc", roc_auc_score(targets, scores)
    rate = "sensitivity" if targets.sum() else "specificity"
    if val_scores is None:
        return rate, None
    threshold = choose_threshold(val_targets, val_scores)
    return rate, binary_metrics(targets, scores, threshold)[rate]


def ordered(scored: dict, split: str, paths: list[str]) -> np.ndarray:
    """A member's scores of ``split`` in the order of ``paths``."""
    position = {p: i for i, p in enumerate(scored[split][0])}
    return scored[split][3][[position[p] for p in paths]]


def main(argv=None) -> None:
    from sklearn.metrics import roc_auc_score
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crossval_dirs", nargs="+")
    parser.add_argument("--views", type=int, help="test-time views for every run "
                        "(default: each run's own)")
    parser.add_argument("--per-image", action="store_true",
                        help="views drawn per image instead of shared by all images")
    parser.add_argument("--source", default="raddb",
                        help="the source whose random-split score gets its own figure")
    args = parser.parse_args(argv)
    if args.per_image:
        transforms.source_cue_view = per_image_view
    results = [json.loads((Path(d) / "crossval.json").read_text()) for d in args.crossval_dirs]
    for index, row in enumerate(results[0]["folds"] + [results[0].get("random_split")]):
        if row is None:
            continue
        rows = [r["random_split"] if row is results[0].get("random_split") else r["folds"][index]
                for r in results]
        members = [score_run(r["run"], args.views) for r in rows]
        paths, targets, sources, _ = members[0]["test"]
        cells = [f"{row['fold']}:"]
        cells += ["as trained:"] + [f"arm{i} {r['value']:.3f}" for i, r in enumerate(rows)]
        if any(sorted(m["test"][0]) != sorted(paths) for m in members):
            print(" ".join(cells + ["scored: test sets differ"]), flush=True)
            continue
        test = np.mean([ordered(m, "test", paths) for m in members], axis=0)
        val_paths, val_targets = members[0]["val"][0], members[0]["val"][1]
        same_val = all(sorted(m["val"][0]) == sorted(val_paths) for m in members)
        val = np.mean([ordered(m, "val", val_paths) for m in members], axis=0) \
            if same_val else None
        metric, value = fold_value(targets, test, val_targets, val)
        cells.append(f"scored: {metric} " + ("n/a (validation splits differ)"
                                              if value is None else f"{value:.3f}"))
        chosen = sources == args.source
        if row is results[0].get("random_split") and 0 < targets[chosen].sum() < chosen.sum():
            cells.append(f"{args.source} only {roc_auc_score(targets[chosen], test[chosen]):.3f}")
        print(" ".join(cells), flush=True)


if __name__ == "__main__":
    main()
