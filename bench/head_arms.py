"""Screen heads and features on frozen ImageNet features, before a recipe becomes a crossval arm.

For each pixel option the images of a data set are prepared once (the product's own
``load_images``, with the shipped lung segmenter for a lung crop) and pooled features of the
frozen backbone are computed once: the last stage alone (what the product's head sees), and the
last stage beside the pooled outputs of lower stages. Heads are then fitted in seconds on the
folds crossval uses (the sources ``--exclude-confounded`` keeps, split by
``data.split.assign_splits`` with each seed; every other source held out), so that many
head x feature x pixel arms can be compared on the same records:

    python bench/head_arms.py ../shared/data/cxr-dev --source-from-prefix --out bench/out/arms \\
        --options none eq-crop clahe-crop eq-lungs clahe-lungs --seeds 0 1 2

Heads: ``keras`` (the product's: dropout 0.3 and one sigmoid unit, Adam 1e-3, 10 epochs, class
weights, the epoch of best validation ROC-AUC kept), ``keras-ls`` (the same with label smoothing
0.1 and an L2 penalty of 1e-3 on the unit's weights), ``logreg-C`` (standardised features,
L2-regularised logistic regression at C). Each held-out source is scored as crossval scores it
(ROC-AUC with both classes, else the rate of its class at the threshold frozen on validation).
A screen, not the evidence: the arms that matter are then run through ``covidxray crossval``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidxray.config import LUNG_CROP, Preprocessing
from covidxray.data.sources import select_sources
from covidxray.data.dataset import discover, load_images
from covidxray.data.split import assign_splits
from covidxray.metrics import binary_metrics, choose_threshold, roc_auc

OPTIONS = {"none": ("none", 0.0), "eq-crop": ("equalize", 0.08), "clahe-crop": ("clahe", 0.08),
           "eq": ("equalize", 0.0), "clahe": ("clahe", 0.0),
           "eq-lungs": ("equalize", LUNG_CROP), "clahe-lungs": ("clahe", LUNG_CROP),
           "none-lungs": ("none", LUNG_CROP)}
# the layers whose pooled outputs the multi-stage features add to the last stage's (Lite0)
LOWER_STAGES = {"block6": "block6d_add", "block5": "block5c_add", "block4": "block4c_add"}


def features(records, spec: Preprocessing, backbone: str, cache: Path) -> dict:
    """Pooled features of every record's image: ``top`` (the last stage) and each of
    ``LOWER_STAGES``, cached in ``cache`` as one .npz per pixel option."""
    file = cache / f"{backbone}-{spec.name}.npz"
    if file.is_file():
        with np.load(file) as saved:
            return {k: saved[k] for k in saved.files}
    import keras

    from covidxray.model.lungs import LungSegmenter
    from covidxray.model.network import backbone_of, build_model
    segmenter = LungSegmenter.load() if spec.lung_crop else None
    loaded = load_images(records, spec, segmenter=segmenter)
    model = build_model(spec.image_size, backbone, "imagenet")
    base = backbone_of(model)
    names = {"top": base.output, **{k: base.get_layer(v).output
                                    for k, v in LOWER_STAGES.items()}}
    inner = keras.Model(base.input, list(names.values()))
    image = keras.Input(model.input_shape[1:])
    pooled = [keras.layers.GlobalAveragePooling2D()(x)
              for x in inner(model.get_layer("backbone_input")(image), training=False)]
    extractor = keras.Model(image, pooled)
    outputs = extractor.predict(loaded.images[..., None], batch_size=32, verbose=0)
    arrays = {name: np.asarray(value, np.float32) for name, value in zip(names, outputs)}
    arrays["paths"] = np.array([r.path for r in loaded.records])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, **arrays)
    return arrays


def fit_keras_head(x, y, val_x, val_y, seed: int, smoothing: float = 0.0, l2: float = 0.0):
    import keras
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((x.shape[1],))
    hidden = keras.layers.Dropout(0.3, seed=seed)(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=(
        keras.regularizers.L2(l2) if l2 else None))(hidden)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.BinaryCrossentropy(label_smoothing=smoothing))
    weights = len(y) / (2 * np.bincount(y.astype(int), minlength=2)[y.astype(int)])
    best, kept = -1.0, None
    for _ in range(10):
        model.fit(x, y, sample_weight=weights, batch_size=32, epochs=1, verbose=0)
        score = roc_auc(val_y, model.predict(val_x, verbose=0).ravel())
        if score > best:
            best, kept = score, [w.numpy() if hasattr(w, "numpy") else
                                 keras.ops.convert_to_numpy(w) for w in model.weights]
    for weight, value in zip(model.weights, kept):
        weight.assign(value)
    return lambda z: model.predict(z, verbose=0).ravel()


def fit_logreg(x, y, c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced",
                                                               max_iter=5000))
    model.fit(x, y)
    return lambda z: model.predict_proba(z)[:, 1]


HEADS = {"keras": lambda x, y, vx, vy, seed: fit_keras_head(x, y, vx, vy, seed),
         "keras-ls": lambda x, y, vx, vy, seed: fit_keras_head(x, y, vx, vy, seed, 0.1, 1e-3),
         "logreg-0.01": lambda x, y, vx, vy, seed: fit_logreg(x, y, 0.01),
         "logreg-0.1": lambda x, y, vx, vy, seed: fit_logreg(x, y, 0.1)}
FEATURES = {"last": ("top",), "last+6": ("top", "block6"),
            "last+6+5": ("top", "block6", "block5"),
            "last+6+5+4": ("top", "block6", "block5", "block4")}


def score(y_true, scores, threshold) -> tuple[str, float]:
    if 0 < y_true.sum() < len(y_true):
        return "roc_auc", roc_auc(y_true, scores)
    metrics = binary_metrics(y_true, scores, threshold)
    return ("sensitivity", metrics["sensitivity"]) if y_true.sum() else \
        ("specificity", metrics["specificity"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--source-from-prefix", action="store_true")
    parser.add_argument("--options", nargs="+", default=["none", "eq-crop", "clahe-crop"],
                        choices=list(OPTIONS))
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=list(FEATURES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    dataset = discover(args.data, None, args.source_from_prefix)
    records = [replace(r, split="") for r in dataset.records]
    pool, left_out = select_sources(records, exclude_confounded=True)
    rows = []
    for option in args.options:
        intensity, crop = OPTIONS[option]
        arrays = features(records, Preprocessing(args.image_size, intensity, crop),
                          args.backbone, out / "features")
        index = {path: i for i, path in enumerate(arrays["paths"])}
        for seed in args.seeds:
            split = {r.path: r.split for r in assign_splits(pool, (0.7, 0.15, 0.15), seed)}
            groups = {"train": [], "val": [], "random-split test": []}
            for r in pool:
                if r.path in index:
                    name = split[r.path] if split[r.path] != "test" else "random-split test"
                    groups[name].append((index[r.path], r.target))
            for held in sorted(left_out):
                groups[held] = [(index[r.path], r.target) for r in records
                                if r.source == held and r.path in index]
            for feature_name, parts in [(f, FEATURES[f]) for f in args.features]:
                matrix = np.concatenate([arrays[p] for p in parts], axis=1)

                def part(name):
                    rows_, targets = zip(*groups[name])
                    return matrix[list(rows_)], np.array(targets, np.float32)

                (x, y), (vx, vy) = part("train"), part("val")
                for head in args.heads:
                    predict = HEADS[head](x, y, vx, vy, seed)
                    val_scores = predict(vx)
                    threshold = choose_threshold(vy, val_scores)
                    row = {"option": option, "features": feature_name, "head": head,
                           "seed": seed, "val_roc_auc": roc_auc(vy, val_scores)}
                    for held in [g for g in groups if g not in ("train", "val")]:
                        tx, ty = part(held)
                        metric, value = score(ty, predict(tx), threshold)
                        row[held] = value
                        row[f"{held} metric"] = metric
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    (out / "arms.json").write_text(json.dumps(rows, indent=1))
    summary(rows)


def summary(rows: list[dict]) -> None:
    """Mean over seeds per arm, one line each."""
    arms = {}
    for row in rows:
        arms.setdefault((row["option"], row["features"], row["head"]), []).append(row)
    held = [k for k in rows[0] if k not in ("option", "features", "head", "seed")
            and not k.endswith("metric")]
    print("| pixels | features | head | " + " | ".join(held) + " |")
    print("|---" * (3 + len(held)) + "|")
    for (option, feature, head), members in arms.items():
        cells = [f"{np.mean([m[k] for m in members]):.3f}" for k in held]
        print(f"| {option} | {feature} | {head} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
