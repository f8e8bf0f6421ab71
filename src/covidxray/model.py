"""Build the classifier: a keras.applications backbone, global average pooling, dropout and one
sigmoid unit = P(COVID). Weights are resolved by name (imagenet / none) or from a local file."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import keras
import numpy as np
from keras import ops

from covidxray.config import AugmentConfig

OUTPUT_NAME = "p_covid"
RANDOM_INIT_BATCHNORM_MOMENTUM = 0.9


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be had (offline, or a missing file); the message says what to do."""


@dataclass(frozen=True)
class Backbone:
    """A keras.applications family with the metadata the rest of the code needs."""

    name: str
    constructor: str  # attribute of keras.applications
    preprocessing: str  # what the ImageNet weights expect: caffe | torch | tf | none
    weights_file: str  # the no-top file Keras caches under ~/.keras/models
    weights_url: str  # where Keras downloads it from
    stage_prefixes: tuple[str, ...]  # layer-name prefixes of the stages, top stage first


_RESNET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
BACKBONES = {
    name: Backbone(name, constructor, "caffe",
                   f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   f"{_RESNET_URL}{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                   ("conv5_", "conv4_", "conv3_", "conv2_"))
    for name, constructor in (("resnet50", "ResNet50"), ("resnet101", "ResNet101"),
                              ("resnet152", "ResNet152"))
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") from None


@keras.saving.register_keras_serializable(package="covidxray")
class BackboneInput(keras.layers.Layer):
    """Grayscale 0..255 images (H, W, 1) -> the three-channel input the backbone's weights expect.

    Living inside the model, this step is saved with it, so no caller can forget it.
    """

    MODES = ("caffe", "torch", "tf", "none")

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        x = ops.concatenate([x, x, x], axis=-1)
        if self.mode == "caffe":  # BGR means of ImageNet, no scaling
            x = x - ops.convert_to_tensor([103.939, 116.779, 123.68], dtype=x.dtype)
        elif self.mode == "torch":
            mean = ops.convert_to_tensor([0.485, 0.456, 0.406], dtype=x.dtype)
            std = ops.convert_to_tensor([0.229, 0.224, 0.225], dtype=x.dtype)
            x = (x / 255.0 - mean) / std
        elif self.mode == "tf":
            x = x / 127.5 - 1.0
        return x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 3)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME`` or ``~/.keras``)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def resolve_weights(weights: str, backbone: Backbone, timeout: float = 5.0) -> str | None:
    """``none`` -> None, ``imagenet`` -> "imagenet" when cached or reachable, else a path.

    Offline, Keras' own download would fail only after name resolution or a connect timeout;
    a quick reachability check fails within ``timeout`` seconds with a message saying what to do.
    """
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        if (keras_cache_dir() / backbone.weights_file).is_file():
            return "imagenet"
        host = urlparse(backbone.weights_url).hostname
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
        except OSError as exc:
            raise WeightsUnavailableError(_offline_message(backbone, str(exc))) from exc
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found (use --weights imagenet, "
                                      f"none, or the path of a {backbone.weights_file} file)")
    return str(path)


def _offline_message(backbone: Backbone, reason: str) -> str:
    return (f"cannot download the ImageNet weights of {backbone.name} ({reason}). Keras expects "
            f"the file {backbone.weights_file} (from {backbone.weights_url}) in "
            f"{keras_cache_dir()}. Copy it there from a connected machine, or pass it with "
            f"--weights PATH, or train from scratch with --weights none.")


def augmentation_layers(config: AugmentConfig, seed: int) -> list[keras.layers.Layer]:
    """Small geometric and photometric changes; active only while training."""
    layers = []
    if config.rotation_degrees:
        layers.append(keras.layers.RandomRotation(config.rotation_degrees / 360.0,
                                                  fill_mode="constant", seed=seed))
    if config.zoom:
        layers.append(keras.layers.RandomZoom(config.zoom, fill_mode="constant", seed=seed + 1))
    if config.translation:
        layers.append(keras.layers.RandomTranslation(config.translation, config.translation,
                                                     fill_mode="constant", seed=seed + 2))
    if config.brightness:
        layers.append(keras.layers.RandomBrightness(config.brightness, seed=seed + 3))
    if config.contrast:
        layers.append(keras.layers.RandomContrast(config.contrast, seed=seed + 4))
    if config.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
    return layers


def build_model(image_size: int, backbone: str = "resnet50", weights: str = "imagenet",
                dropout: float = 0.3, augment: AugmentConfig | None = None,
                seed: int = 0) -> keras.Model:
    """The classifier, with its backbone frozen (phase 1 of training)."""
    spec = get_backbone(backbone)
    resolved = resolve_weights(weights, spec)
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = inputs
    if augment is not None and augment.enabled():
        x = keras.Sequential(augmentation_layers(augment, seed), name="augmentation")(x)
    x = BackboneInput(spec.preprocessing, name="backbone_input")(x)
    try:
        base = getattr(keras.applications, spec.constructor)(
            include_top=False, weights=resolved, input_shape=(image_size, image_size, 3))
    except Exception as exc:
        if resolved == "imagenet" and "fetch failure" in str(exc).lower():
            raise WeightsUnavailableError(_offline_message(spec, str(exc))) from exc
        raise
    base.trainable = False
    if resolved is None:
        # random weights: BatchNorm must learn its statistics, and Keras' default momentum
        # (0.99) needs hundreds of steps before inference-mode outputs stop saturating
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = RANDOM_INIT_BATCHNORM_MOMENTUM
        x = base(x)
    else:
        # pretrained: BatchNorm stays in inference mode, also once the top stages are unfrozen
        x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME)(x)
    return keras.Model(inputs, outputs, name=f"covidxray_{spec.name}")


def backbone_of(model: keras.Model) -> keras.Model:
    """The keras.applications sub-model inside a classifier built by ``build_model``."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "augmentation":
            return layer
    raise ValueError(f"model {model.name} has no backbone sub-model")


def unfreeze_top_stages(model: keras.Model, backbone: str, stages: int,
                        freeze_batchnorm: bool = True) -> None:
    """Phase 2: make the top ``stages`` stages trainable.

    BatchNorm layers of pretrained weights stay frozen (their ImageNet statistics are kept);
    from random weights they must train.
    """
    spec = get_backbone(backbone)
    if not 1 <= stages <= len(spec.stage_prefixes):
        raise ValueError(f"{spec.name} has {len(spec.stage_prefixes)} stages; "
                         f"cannot unfreeze {stages}")
    prefixes = spec.stage_prefixes[:stages]
    base = backbone_of(model)
    base.trainable = True
    for layer in base.layers:
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer.name.startswith(prefixes) and not (is_batchnorm
                                                                   and freeze_batchnorm)


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(positive) for (n, size, size) uint8 images already through ``imageio.prepare``."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.float32)
    scores = model.predict(np.asarray(images)[..., None], batch_size=batch_size, verbose=0)
    return np.asarray(scores, dtype=np.float32).ravel()


def embed_and_score(model: keras.Model, images: np.ndarray,
                    batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The pooled backbone features (n, channels) and P(positive) from one forward pass."""
    if len(images) == 0:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.float32)
    pooled = keras.Model(model.inputs, model.get_layer("pool").output)
    embeddings = np.asarray(pooled.predict(np.asarray(images)[..., None], batch_size=batch_size,
                                           verbose=0), dtype=np.float32)
    scores = keras.ops.convert_to_numpy(model.get_layer(OUTPUT_NAME)(embeddings))
    return embeddings, np.asarray(scores, dtype=np.float32).ravel()
