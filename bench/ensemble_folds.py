"""Score finished ``covidxray crossval`` arms again, fold by fold, through the product's own
``Predictor`` (each run's preprocessing and test-time views): one arm with another number of
test-time views, or an ensemble of arms (the mean P(COVID) of their fold runs).

Each fold gets the metric crossval gives it (``crossval.fold_score``); a rate at a threshold (a
single-class held-out source) uses the threshold chosen on the mean validation scores (Youden's
J, as training does by default). Arms trained with other seeds have other
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
import covidxray.pixels.transforms as transforms
from covidxray.data.dataset import discover, load_images
from covidxray.evaluation.crossval import fold_score
from covidxray.evaluation.evaluate import per_source, summarise
from covidxray.metrics import choose_threshold
from covidxray.run.folder import RunFolder
from covidxray.run.predictor import Predictor


def per_image_view(images, view, seed=0, augment=None):
    """The variant: each image's view seeded by its pixels, so images get different draws."""
    augment = augment or transforms.SourceAugment()
    return np.stack([transforms.augment_prepared(
        image, augment, np.random.default_rng((seed, view, zlib.crc32(image.tobytes()))))
        for image in images]).reshape(images.shape)


def score_run(run: str, views: int | None = None, held_out: list | None = None) -> dict:
    """split -> (records, scores) of a fold run's validation and test images (``held_out``:
    the held-out source's records as its test images), with ``views`` test-time views instead
    of the run's own number where given; records sorted by path, so that runs of one split
    line up."""
    predictor = Predictor.load(run)
    if views is not None:
        predictor = predictor.with_test_time_views(views)
    records = sorted(RunFolder(run).read_split(predictor.positive_class),
                     key=lambda r: r.path)
    scored = {}
    for split in ("val", "test"):
        chosen = held_out if split == "test" and held_out is not None else \
            [r for r in records if r.split == split]
        loaded = load_images(chosen, predictor.preprocessing, segmenter=predictor.segmenter)
        scored[split] = (loaded.records, predictor.predict_prepared(loaded.images))
    return scored


def aligned_rows(results: list[dict]):
    """The rows of every result that score the same fold: each held-out source, then the
    random split where every result has one."""
    for index in range(len(results[0]["folds"])):
        yield [r["folds"][index] for r in results]
    if all("random_split" in r for r in results):
        yield [r["random_split"] for r in results]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("crossval_dirs", nargs="+")
    parser.add_argument("--views", type=int, help="test-time views for every run "
                        "(default: each run's own)")
    parser.add_argument("--per-image", action="store_true",
                        help="views drawn per image instead of shared by all images")
    parser.add_argument("--source", default="raddb",
                        help="the source whose random-split score gets its own figure")
    parser.add_argument("--bootstrap", type=int, default=0,
                        help="resamples for 95%% intervals (default none)")
    args = parser.parse_args(argv)
    if args.per_image:
        transforms.source_cue_view = per_image_view
    results = [json.loads((Path(d) / "crossval.json").read_text()) for d in args.crossval_dirs]
    dataset = discover(results[0]["data"], source_from_prefix=True)
    for rows in aligned_rows(results):
        if any("run" not in row for row in rows):  # a source trained on is not held out
            continue
        held_out = None
        if rows[0]["fold"].startswith("holdout-"):
            source = rows[0]["fold"][len("holdout-"):]
            held_out = sorted((r for r in dataset.records if r.source == source),
                              key=lambda r: r.path)
            if len({r.target for r in held_out}) < 2 and len({row["run"] for row in rows}) > 1:
                # one class: a rate at a threshold, chosen on validation splits that differ
                print(f"{rows[0]['fold']}: as trained",
                      *(f"{row['value']:.3f}" for row in rows), "| scored: n/a (one class, "
                      "validation splits differ)", flush=True)
                continue
        members = [score_run(row["run"], args.views, held_out) for row in rows]
        cells = [f"{rows[0]['fold']}: as trained", *(f"{row['value']:.3f}" for row in rows)]
        (test_records, _), (val_records, _) = members[0]["test"], members[0]["val"]
        if any(m["test"][0] != test_records for m in members):
            print(*cells, "| scored: test sets differ", flush=True)
            continue
        test = np.mean([m["test"][1] for m in members], axis=0)
        y_test = np.array([r.target for r in test_records])
        if all(m["val"][0] == val_records for m in members):
            threshold = choose_threshold(np.array([r.target for r in val_records]),
                                         np.mean([m["val"][1] for m in members], axis=0))
        elif 0 < y_test.sum() < len(y_test):
            threshold = 0.5  # ROC-AUC does not depend on it
        else:
            print(*cells, "| scored: n/a (validation splits differ)", flush=True)
            continue
        score = fold_score({"overall": summarise(y_test, test, threshold, args.bootstrap, 0)})
        cells += ["| scored:", score["metric"], f"{score['value']:.3f}"]
        if args.bootstrap:
            cells.append("({:.3f}-{:.3f})".format(*score["ci95"]))
        if rows[0]["fold"] == "random-split":
            by_source = per_source(test_records, test, threshold, 0, 0)
            if args.source in by_source:
                source = fold_score({"overall": by_source[args.source]})
                cells += [f"{args.source} only", source["metric"], f"{source['value']:.3f}"]
        print(*cells, flush=True)


if __name__ == "__main__":
    main()
