"""Build the classifier: a registered backbone, global average pooling, dropout and one sigmoid
unit = P(COVID); one forward pass to the last stage gives scores, embeddings and Grad-CAM."""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import keras
import numpy as np
from keras import ops

from covidxray.errors import ConfigError
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


@keras.saving.register_keras_serializable(package="covidxray")
class StagePool(keras.layers.Layer):
    """Global average pooling of each of several feature maps (the backbone's top stages),
    concatenated: the head reads the last stage's features beside lower, less ImageNet-specific
    ones."""

    def call(self, maps):
        return ops.concatenate([ops.mean(m, axis=(1, 2)) for m in maps], axis=-1)

    def compute_output_shape(self, input_shapes):
        return (input_shapes[0][0], sum(shape[-1] for shape in input_shapes))


def stage_outputs(base: keras.Model, backbone: str, stages: int) -> list:
    """The outputs of ``backbone``'s top ``stages`` stages inside ``base``: the last layer of
    each (the top stage's is the backbone's own output)."""
    prefixes = get_backbone(backbone).stages
    if not 1 <= stages <= len(prefixes):
        raise ConfigError(f"{backbone} has {len(prefixes)} stages; cannot pool {stages}")
    outputs = [base.output]
    for stage in prefixes[1:stages]:
        last = [layer for layer in base.layers if layer.name.startswith(stage)][-1]
        outputs.append(last.output)
    return outputs


def build_model(image_size: int, backbone: str = "resnet50", weights: str = "imagenet",
                dropout: float = 0.3, augment: AugmentConfig | None = None,
                seed: int = 0, pooled_stages: int = 1, classes: int = 2) -> keras.Model:
    """The classifier, with its backbone frozen (phase 1 of training); ``pooled_stages``: the
    head reads the pooled outputs of that many of the backbone's top stages; ``classes``: 2,
    one sigmoid unit (P(positive)); 3 or more, a softmax over them."""
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
    if pooled_stages > 1:
        base = keras.Model(base.input, stage_outputs(base, backbone, pooled_stages),
                           name=base.name)
    if resolved is None:
        x = base(x)
    else:
        # pretrained: BatchNorm stays in inference mode, also once the top stages are unfrozen
        x = base(x, training=False)
    pool = StagePool(name="pool") if pooled_stages > 1 else \
        keras.layers.GlobalAveragePooling2D(name="pool")
    x = pool(x)
    x = keras.layers.Dropout(dropout, seed=seed, name="dropout")(x)
    # float32 whatever the dtype policy: a bfloat16 sigmoid cannot tell 0.999 from 1
    # its own seed: the same run whatever else drew random numbers first (backbone weights
    # converted, or a lung segmenter built, on a first run and not on later ones)
    outputs = keras.layers.Dense(1 if classes == 2 else classes,
                                 activation="sigmoid" if classes == 2 else "softmax",
                                 kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
                                 name=OUTPUT_NAME, dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"covidxray_{spec.name}")


def model_id(model: keras.Model, backbone: str, image_size: int) -> str:
    """Backbone, image size and the first 12 hex digits of the sha256 of every weight: two
    models share an id only if they share every weight."""
    import hashlib
    digest = hashlib.sha256()
    for weight in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    return f"{get_backbone(backbone).name}-{image_size}px-{digest.hexdigest()[:12]}"


def head_weights(model: keras.Model) -> dict[str, np.ndarray]:
    """What training changed of a classifier whose backbone stayed frozen: the output
    layer's kernel and bias (the backbone's weights are its ImageNet ones)."""
    kernel, bias = model.get_layer(OUTPUT_NAME).get_weights()
    return {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}


def classifier_from_head(build: dict, head: dict[str, np.ndarray]) -> keras.Model:
    """A classifier as ``build_model(**build)`` makes it (ImageNet backbone), with the output
    layer's weights of ``head`` (``head_weights``): a run trained with the backbone frozen,
    rebuilt from its head alone."""
    build = dict(build)
    augment = build.pop("augment", None)
    model = build_model(augment=AugmentConfig(**augment) if augment else None, **build)
    model.get_layer(OUTPUT_NAME).set_weights([head["kernel"], head["bias"]])
    return model


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
        raise ConfigError(f"{spec.name} has {len(spec.stages)} stages; cannot unfreeze "
                          f"{stages}")
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


def data_parallel_devices() -> int:
    """The devices a batch is split over under the active ``keras.distribution`` (1: none)."""
    distribution = keras.distribution.distribution()
    return len(distribution.device_mesh.devices.ravel()) if distribution is not None else 1


def padded(images: np.ndarray, multiple: int) -> np.ndarray:
    """``images`` with copies of the first appended up to a multiple of ``multiple`` (data
    parallel: every batch, the last one too, must split evenly over the devices); the caller
    keeps the first ``len(images)`` results."""
    extra = -len(images) % multiple
    return images if not extra else np.concatenate([images, np.repeat(images[:1], extra, 0)])


def predict_padded(model: keras.Model, inputs: np.ndarray, batch_size: int):
    """``model.predict`` of any (n, ...) inputs, whatever n under data parallelism."""
    n = len(inputs)
    out = model.predict(padded(np.asarray(inputs), data_parallel_devices()),
                        batch_size=batch_size, verbose=0)
    return [o[:n] for o in out] if isinstance(out, (list, tuple)) else out[:n]


def _predict(model: keras.Model, images: np.ndarray, batch_size: int):
    """``predict_padded`` of (n, size, size) images."""
    return predict_padded(model, np.asarray(images)[..., None], batch_size)


def predict_scores(model: keras.Model, images: np.ndarray, batch_size: int = 32,
                   positive: int = 0) -> np.ndarray:
    """P(positive) for (n, size, size) uint8 images already through ``pixels.preprocess.prepare``
    (``positive``: its column of a softmax head)."""
    if len(images) == 0:
        return np.zeros(0, dtype=np.float32)
    out = np.asarray(_predict(model, images, batch_size), dtype=np.float32)
    return out[:, positive] if out.shape[1] > 1 else out.ravel()


def feature_extractor(model: keras.Model) -> keras.Model:
    """The classifier up to its pooling layer: the last convolutional stage (or, with pooled
    stages, each of them)."""
    return keras.Model(model.inputs, model.get_layer("pool").input)


def logit_terms(maps: list[np.ndarray], kernel: np.ndarray) -> np.ndarray:
    """Each location's term of the logit, (n, H, W) at the finest of the stages' resolutions.

    Stage s contributes w_s . F_s(i, j) / (h_s * w_s) at each of its locations; a coarser
    stage's term is spread evenly over the finer locations it covers, so the map still sums to
    the logit (less the bias)."""
    height, width = max(m.shape[1] for m in maps), max(m.shape[2] for m in maps)
    total, offset = np.zeros((maps[0].shape[0], height, width), np.float32), 0
    for features in maps:
        channels = features.shape[-1]
        terms = features @ kernel[offset:offset + channels] / np.prod(features.shape[1:3])
        offset += channels
        fy, fx = height // terms.shape[1], width // terms.shape[2]
        if fy * terms.shape[1] != height or fx * terms.shape[2] != width:
            raise ValueError(f"stage maps of {terms.shape[1:]} do not tile {height}x{width}")
        total += np.repeat(np.repeat(terms, fy, axis=1), fx, axis=2) / (fy * fx)
    return total


def forward(model: keras.Model, images: np.ndarray, batch_size: int = 32,
            extractor: keras.Model | None = None, maps: bool = False,
            positive: int = 0) -> Forward:
    """Embeddings, scores and (with ``maps``) per-location logit terms from one pass.

    The head is global average pooling -> one sigmoid unit, so the logit is the sum over
    locations of w . F(i, j) / (h * w): the map of those terms is what Grad-CAM shows (with
    pooled stages, ``logit_terms`` sums theirs). A softmax head: the scores and the map are
    the ``positive`` class's (its probability, its logit), and every class's probability is
    kept. ``extractor`` is ``feature_extractor(model)``, built once by callers that predict
    often.
    """
    extractor = extractor or feature_extractor(model)
    head = model.get_layer(OUTPUT_NAME)
    column = positive if head.units > 1 else 0
    kernel = keras.ops.convert_to_numpy(head.kernel)[:, column].astype(np.float32)
    embeddings, logit_maps = [], []
    chunk = batch_size * 8  # bounds the memory of the feature maps (7x7x2048 at 224 px)
    for start in range(0, len(images), chunk):
        outputs = _predict(extractor, images[start:start + chunk], batch_size)
        stages = [np.asarray(o, np.float32) for o in (
            outputs if isinstance(outputs, (list, tuple)) else [outputs])]
        embeddings.append(np.concatenate([f.mean(axis=(1, 2)) for f in stages], axis=1))
        if maps:
            logit_maps.append(logit_terms(stages, kernel))
    if not embeddings:
        return Forward(np.zeros((0, 0), np.float32), np.zeros(0, np.float32),
                       np.zeros((0, 0, 0), np.float32) if maps else None)
    embeddings = np.concatenate(embeddings)
    out = np.asarray(keras.ops.convert_to_numpy(head(embeddings)), np.float32)
    return Forward(embeddings, out[:, column], np.concatenate(logit_maps) if maps else None,
                   probabilities=out if head.units > 1 else None)


def gradcam(model: keras.Model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM maps (n, h, w) of the last convolutional stage for P(positive), on the model's
    input (n, size, size) uint8 images, each in [0, 1]."""
    return cams_from_logit_maps(forward(model, np.asarray(images), batch_size, maps=True)
                                .logit_maps)


def inference_graph(model: keras.Model, positive: int = 0) -> keras.Model:
    """The classifier as one graph with every output a prediction needs: P(positive) (n, 1),
    the pooled embeddings (n, c) for the out-of-distribution gate, each location's term of the
    (positive class's) logit (n, h, w) for Grad-CAM, and a softmax head's probabilities of
    every class (n, classes); for export, where no Keras is left to compute the rest."""
    # a new input straight into the backbone: the augmentation layers (identity at inference)
    # would leave random-number generators in an exported graph
    inputs = keras.Input(model.input_shape[1:], name="image")
    features = backbone_of(model)(model.get_layer("backbone_input")(inputs), training=False)
    head = model.get_layer(OUTPUT_NAME)
    embeddings = model.get_layer("pool")(features)
    probabilities = head(embeddings)
    column = positive if head.units > 1 else 0
    score = probabilities[:, column:column + 1] if head.units > 1 else probabilities
    stages = features if isinstance(features, (list, tuple)) else [features]
    height = max(f.shape[1] for f in stages)
    width = max(f.shape[2] for f in stages)

    def terms_of(maps):  # logit_terms, in Keras operations
        total, offset = 0.0, 0
        for f in maps:
            channels = f.shape[-1]
            term = keras.ops.einsum("nhwc,c->nhw", f,
                                    head.kernel[offset:offset + channels, column]
                                    ) / float(f.shape[1] * f.shape[2])
            offset += channels
            fy, fx = height // f.shape[1], width // f.shape[2]
            if fy > 1 or fx > 1:
                term = keras.ops.repeat(keras.ops.repeat(term, fy, axis=1), fx, axis=2) \
                    / float(fy * fx)
            total = total + term
        return total

    terms = keras.layers.Lambda(terms_of, name="logit_terms")(stages)
    outputs = [score, embeddings, terms] + ([probabilities] if head.units > 1 else [])
    return keras.Model(inputs, outputs, name=f"{model.name}_inference")
