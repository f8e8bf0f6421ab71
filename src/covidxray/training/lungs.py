"""Training the lung segmenter (``model.lungs``): ``train_segmenter`` on folders of image/mask
pairs (``data.masks``), split by patient, the best epoch by validation Dice kept, its weights
and model card (with the held-out Dice and IoU per folder) written out; the command is
``covidxray lungs train``.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from pathlib import Path

import numpy as np

from covidxray.config import LUNG_TRAINING, LungTrainConfig
from covidxray.data.masks import MaskPair, load_pairs, read_pairs, split_pairs
from covidxray.fileutil import write_json_atomic
from covidxray.model.lungs import CARD_NAME, LungCard, LungSegmenter, build_unet, save_weights
from covidxray.pixels.decode import read_image
from covidxray.pixels.lungfield import lung_field

log = logging.getLogger(__name__)

NOT_SHOWN = ["normal screening films (hardly any normal film in the data)", "children",
             "lateral views, CT, or anything but adult frontal chest radiographs"]


def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean masks (1, 1 when both are empty)."""
    overlap = float(np.logical_and(predicted, truth).sum())
    total = float(predicted.sum() + truth.sum())
    union = float(np.logical_or(predicted, truth).sum())
    return (2 * overlap / total if total else 1.0, overlap / union if union else 1.0)


def _augmented(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
    """A random rotation, scale and shift of an image and its mask together, and a random
    gamma and contrast of the image: films come rotated, framed and exposed in many ways."""
    from scipy.ndimage import affine_transform
    size = image.shape[0]
    angle = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.08, 0.08, 2) * size
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) / scale
    centre = np.array([size / 2, size / 2])
    offset = centre - rotation @ (centre + shift)
    image = affine_transform(image.astype(np.float32) / 255.0, rotation, offset, order=1,
                             mode="constant", cval=0.0)
    mask = affine_transform(mask, rotation, offset, order=1, mode="constant", cval=0.0)
    image = np.clip(image, 0, 1) ** np.exp(rng.uniform(-0.4, 0.4))
    image = np.clip((image - 0.5) * rng.uniform(0.8, 1.2) + 0.5, 0, 1)
    return np.rint(image * 255).astype(np.float32), mask.astype(np.float32)


def _dice_loss(y_true, y_pred):
    from keras import ops
    overlap = ops.sum(y_true * y_pred, axis=(1, 2, 3))
    total = ops.sum(y_true, axis=(1, 2, 3)) + ops.sum(y_pred, axis=(1, 2, 3))
    return 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)


def _loss(y_true, y_pred):
    import keras
    return keras.losses.binary_crossentropy(y_true, y_pred, axis=(1, 2, 3)) + \
        _dice_loss(y_true, y_pred)


def heldout_scores(segmenter: LungSegmenter, pairs: list[MaskPair]) -> dict:
    """Dice and IoU of the post-processed mask against each pair's own mask, at the mask's
    own resolution: median, mean and 5th percentile per folder."""
    scores: dict[str, list] = {}
    for pair in pairs:
        gray, truth = read_image(pair.image), read_image(pair.mask) > 0.5
        predicted = segmenter.field(gray).mask_at(truth.shape)
        scores.setdefault(pair.subset, []).append(dice_iou(predicted, truth))
    return {subset: {"pairs": len(values),
                     "dice_median": float(np.median([d for d, _ in values])),
                     "dice_mean": float(np.mean([d for d, _ in values])),
                     "dice_p5": float(np.percentile([d for d, _ in values], 5)),
                     "iou_median": float(np.median([i for _, i in values])),
                     "iou_mean": float(np.mean([i for _, i in values]))}
            for subset, values in sorted(scores.items())}


def train_segmenter(folders, out: str | Path, config: LungTrainConfig = LUNG_TRAINING,
                    verbose: int | str = "auto") -> LungCard:
    """Train a segmenter on the pairs of ``folders`` (split 70/15/15 by patient over all of
    them, each folder in proportion; the best epoch by validation Dice is kept) and write its
    weights and card into ``out``; the card carries the held-out Dice and IoU per folder."""
    image_size, base_filters, depth = config.image_size, config.base_filters, config.depth
    epochs, batch_size, seed = config.epochs, config.batch_size, config.seed
    patience, learning_rate, licence = config.patience, config.learning_rate, config.licence
    import keras
    keras.utils.set_random_seed(seed)
    pairs = [p for folder in folders for p in read_pairs(folder)]
    split = split_pairs(pairs, seed=seed)
    part = {name: [p for p in pairs if split[p.group] == name] for name in ("train", "val",
                                                                             "test")}
    train_images, train_masks, _ = load_pairs(part["train"], image_size)
    val_images, val_masks, _ = load_pairs(part["val"], image_size)
    log.info("lung segmenter: %d training pairs, %d validation, %d test (by patient)",
             len(train_images), len(val_images), len(part["test"]))

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def __len__(self):
            return int(np.ceil(len(train_images) / batch_size))

        def on_epoch_end(self):
            self.epoch += 1

        def __getitem__(self, index):
            order = np.random.default_rng((seed, self.epoch)).permutation(len(train_images))
            chosen = order[index * batch_size:(index + 1) * batch_size]
            rng = np.random.default_rng((seed, self.epoch, index))
            views = [_augmented(train_images[i], train_masks[i], rng) for i in chosen]
            return (np.stack([v[0] for v in views])[..., None],
                    np.stack([v[1] for v in views])[..., None])

    model = build_unet(image_size, base_filters, depth)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=_loss,
                  metrics=[keras.metrics.BinaryIoU(target_class_ids=[1], name="iou")])
    best = {"score": -1.0, "weights": None, "epoch": -1}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            scores = []
            probabilities = keras.ops.convert_to_numpy(model.predict(
                val_images[..., None].astype(np.float32), batch_size=32, verbose=0))[..., 0]
            for p, truth in zip(probabilities, val_masks):
                scores.append(dice_iou(lung_field(p).mask, truth >= 0.5)[0])
            score = float(np.mean(scores))
            if logs is not None:
                logs["val_dice"] = score
            if score > best["score"]:
                best.update(score=score, epoch=epoch,
                            weights=[keras.ops.convert_to_numpy(w) for w in model.weights])

    model.fit(Batches(), epochs=epochs, verbose=verbose, shuffle=False,
              callbacks=[KeepBest(), keras.callbacks.ReduceLROnPlateau(
                  "val_dice", mode="max", factor=0.5, patience=max(2, patience // 3)),
                  keras.callbacks.EarlyStopping("val_dice", mode="max", patience=patience)])
    for weight, value in zip(model.weights, best["weights"]):
        weight.assign(value)
    licences: dict[str, dict] = {}
    for p in pairs:
        counts = licences.setdefault(p.subset, {})
        counts[p.licence or "not stated"] = counts.get(p.licence or "not stated", 0) + 1
    card = LungCard(
        name=f"lungs-unet{image_size}", image_size=image_size, base_filters=base_filters,
        depth=depth,
        data=[{"folder": str(Path(f).name), "pairs": sum(p.subset == Path(f).name for p in pairs),
               "patients": len({p.group for p in pairs if p.subset == Path(f).name}),
               "image_licences": licences.get(Path(f).name, {})} for f in folders],
        not_shown=NOT_SHOWN, licence=licence or "as the masks' and images' own licences "
                                                 "(image_licences per folder)",
        training={"epochs_run": int(len(model.history.epoch)) if model.history else 0,
                  "best_epoch": best["epoch"] + 1, "val_dice": best["score"],
                  "split": "70/15/15 by patient over all folders, each folder in proportion",
                  "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
                  "pairs": {k: len(v) for k, v in part.items()}},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    out = Path(out)
    card = save_weights(model, card, out)
    segmenter = LungSegmenter.load(out)
    card = dataclasses.replace(card, heldout=heldout_scores(segmenter, part["test"]))
    write_json_atomic(out / CARD_NAME, card.to_dict())
    return card
