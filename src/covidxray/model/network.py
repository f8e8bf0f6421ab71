"""Build the classifier: a registered backbone, global average pooling, dropout and one sigmoid
unit = P(COVID); one forward pass to the last stage gives scores, embeddings and Grad-CAM."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from covidxray.config import AugmentConfig
from covidxray.model.backbones import get_backbone
from covidxray.model.outputs import Forward, cams_from_logit_maps
from covidxray.model.weights import WeightsUnavailableError, offline_message, resolve_weights

OUTPUT_NAME = "p_covid"
RANDOM_INIT_BATCHNORM_MOMENTUM = 0.9


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
        base = spec.build(include_top=False, weights=resolved,
                          input_shape=(image_size, image_size, 3))
    except Exception as exc:
        if resolved == "imagenet" and "fetch failure" in str(exc).lower():
            raise WeightsUnavailableError(offline_message(spec, str(exc))) from exc
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


def gradcam(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (n, h, w) of the last convolutional stage for P(positive), on the model's
    input (n, size, size) uint8 images, each in [0, 1]."""
    return cams_from_logit_maps(forward(model, np.asarray(images), batch_size, maps=True)
                                .logit_maps)


def inference_graph(model: keras.Model) -> keras.Model:
    """The classifier as one graph with every output a prediction needs: P(positive) (n, 1),
    the pooled embeddings (n, c) for the out-of-distribution gate, and each location's term of
    the logit (n, h, w) for Grad-CAM; for export, where no Keras is left to compute the rest."""
    # a new input straight into the backbone: the augmentation layers (identity at inference)
    # would leave random-number generators in an exported graph
    inputs = keras.Input(model.input_shape[1:], name="image")
    features = backbone_of(model)(model.get_layer("backbone_input")(inputs), training=False)
    head = model.get_layer(OUTPUT_NAME)
    embeddings = model.get_layer("pool")(features)
    score = head(embeddings)
    terms = keras.layers.Lambda(
        lambda f: keras.ops.einsum("nhwc,c->nhw", f, head.kernel[:, 0])
        / float(f.shape[1] * f.shape[2]), name="logit_terms")(features)
    return keras.Model(inputs, [score, embeddings, terms], name=f"{model.name}_inference")
