"""Pretrained weights by name, resolved through torchvision's own weights enums.

A name (``torchvision:maskrcnn_resnet50_fpn.COCO_V1``, or an alias such as ``coco``) gives the
URL, the file name (``<name>-<sha256 prefix>.pth``, torch hub's convention), the class names
and the published figures. The file is looked up in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``); when it is missing it is downloaded there with a progress
bar and its hash checked, and when that fails (offline) the error names the URL, the file and
the folder to put it in. Nothing is downloaded unless a name asks for it.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

log = logging.getLogger("maskrcnn")

PREFIX = "torchvision:"
HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")  # torch.hub's "<name>-<sha256 prefix>.pth"


class WeightsError(ValueError):
    """Weights that cannot be found, fetched or used: the message says which and what to do."""


@dataclass(frozen=True)
class NamedWeights:
    """One entry of :data:`CATALOGUE`: ``builder`` and ``enum``/``member`` name torchvision's
    weights (``torchvision.models.detection.MaskRCNN_ResNet50_FPN_Weights.COCO_V1``);
    ``kind`` is ``detector`` (a whole Mask R-CNN) or ``backbone`` (ImageNet classification
    weights for ``backbone``); ``arch``: the model architecture the file is for."""

    builder: str
    module: str
    enum: str
    member: str
    kind: str
    backbone: str
    aliases: tuple[str, ...] = ()
    arch: str = "v1"

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.builder}.{self.member}"

    def torchvision_weights(self) -> Any:
        """The torchvision enum member (its ``url`` and ``meta``)."""
        return getattr(getattr(importlib.import_module(self.module), self.enum), self.member)

    @property
    def url(self) -> str:
        return str(self.torchvision_weights().url)

    @property
    def file_name(self) -> str:
        return os.path.basename(urlparse(self.url).path)

    @property
    def categories(self) -> list[str]:
        return list(self.torchvision_weights().meta["categories"])

    def summary(self) -> str:
        """What it was trained on and its published figures, from torchvision's metadata."""
        metrics = self.torchvision_weights().meta.get("_metrics", {})
        parts = [
            f"{data}: " + ", ".join(f"{k} {v}" for k, v in values.items())
            for data, values in metrics.items()
        ]
        return "; ".join(parts)


_DETECTION = "torchvision.models.detection"
_MODELS = "torchvision.models"
CATALOGUE: tuple[NamedWeights, ...] = (
    NamedWeights("maskrcnn_resnet50_fpn", _DETECTION, "MaskRCNN_ResNet50_FPN_Weights", "COCO_V1",
                 "detector", "resnet50", aliases=("coco",)),
    NamedWeights("maskrcnn_resnet50_fpn_v2", _DETECTION, "MaskRCNN_ResNet50_FPN_V2_Weights",
                 "COCO_V1", "detector", "resnet50", aliases=("coco_v2",), arch="v2"),
    *(
        NamedWeights(net, _MODELS, enum, "IMAGENET1K_V1", "backbone", net)
        for net, enum in (
            ("resnet18", "ResNet18_Weights"),
            ("resnet34", "ResNet34_Weights"),
            ("resnet50", "ResNet50_Weights"),
            ("resnet101", "ResNet101_Weights"),
            ("vgg16", "VGG16_Weights"),
            ("mobilenet_v2", "MobileNet_V2_Weights"),
        )
    ),
)


def lookup(name: str) -> NamedWeights | None:
    """The catalogue entry of a full name or an alias (case-insensitive), else None."""
    key = name.strip().lower()
    for entry in CATALOGUE:
        if key in (entry.name.lower(), *entry.aliases):
            return entry
    return None


def imagenet(backbone: str) -> NamedWeights:
    """The ImageNet weights of ``backbone`` (what ``backbone_weights=imagenet`` means)."""
    for entry in CATALOGUE:
        if entry.kind == "backbone" and entry.backbone == backbone:
            return entry
    raise WeightsError(f"no ImageNet weights are known for backbone {backbone!r}")


def cache_dir() -> Path:
    """Where torch hub keeps downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def download(url: str, destination: Path, hash_prefix: str | None) -> None:
    """torch hub's download: a progress bar, a temporary file renamed when complete, and the
    SHA-256 of the content checked against ``hash_prefix``."""
    torch.hub.download_url_to_file(url, str(destination), hash_prefix, progress=True)


def fetch(entry: NamedWeights) -> Path:
    """The cached file of ``entry``, downloaded (hash-checked) when missing."""
    path = cache_dir() / entry.file_name
    if path.is_file():
        return path
    found = HASH_IN_NAME.search(entry.file_name)
    log.info("downloading %s to %s", entry.url, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        download(entry.url, path, found.group(1) if found else None)
    except (OSError, RuntimeError) as err:  # offline (URLError is an OSError), bad hash
        raise WeightsError(
            f"{entry.name}: {entry.file_name} is not in {path.parent} and could not be "
            f"downloaded ({err}); download {entry.url} and put it in {path.parent}"
        ) from None
    return path


def read_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    """A state dict of tensors from ``path`` (read with ``weights_only=True``: never code);
    of a training checkpoint its ``model`` entry, of a file that nests it, ``state_dict``."""
    return state_dict_of(load_file(path, what), path, what)


def load_file(path: Path, what: str) -> Any:
    """What ``path`` holds, read with ``weights_only=True``; WeightsErrors name the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):
            raise WeightsError(
                f"{what} ({path}) was refused: it holds Python objects other than tensors "
                "and plain values (loading it could run code)"
            ) from None
        raise WeightsError(f"{what} ({path}) is not a PyTorch weights file") from None
    except (RuntimeError, EOFError) as err:  # e.g. a download cut short
        raise WeightsError(
            f"{what} ({path}) is not a complete PyTorch weights file ({err}); delete it and "
            "download it again"
        ) from None
    return state


def state_dict_of(state: Any, path: Path, what: str) -> dict[str, Tensor]:
    """The state dict in what :func:`load_file` read (see :func:`read_state_dict`)."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{what} ({path}) is not a state dict of tensors")
    return state
