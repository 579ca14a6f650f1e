"""torchvision's Mask R-CNN built as the reference implementation for parity tests."""

from __future__ import annotations

import torch
from torchvision.models import resnet50
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn import MaskRCNN, ModelConfig


def randomize_frozen_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """FrozenBatchNorm starts as the identity; give it statistics so parity means something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            n = m.weight.shape[0]
            m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(1 + 0.1 * torch.rand(n, generator=g))


def build_pair(**cfg_kwargs: object) -> tuple[MaskRCNN, TVMaskRCNN]:
    """Ours and torchvision's ResNet-50-FPN Mask R-CNN with identical random weights."""
    torch.manual_seed(0)
    ours = MaskRCNN(ModelConfig(backbone="resnet50", **cfg_kwargs))  # type: ignore[arg-type]
    randomize_frozen_bn(ours)
    tv_kwargs = {k: v for k, v in cfg_kwargs.items() if k != "num_classes"}
    backbone = _resnet_fpn_extractor(resnet50(weights=None, norm_layer=FrozenBatchNorm2d), 3)
    theirs = TVMaskRCNN(backbone, num_classes=cfg_kwargs.get("num_classes", 91), **tv_kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs
