"""Parity of ``arch=v2`` with torchvision's ``maskrcnn_resnet50_fpn_v2``: state dicts load
strictly both ways; detections, the five losses and every parameter's gradient agree."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.mask_rcnn import MaskRCNN as TVMaskRCNN
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn import MaskRCNN, ModelConfig

SMALL = {"min_size": 224, "max_size": 320}
# torchvision warns that trainable_backbone_layers means nothing without pretrained weights.
pytestmark = pytest.mark.filterwarnings("ignore:Changing trainable_backbone_layers")


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Norms start as the identity; give them statistics so that parity means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                n = m.weight.shape[0]
                m.weight.copy_(1 + 0.1 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))  # type: ignore[operator]
                m.running_var.copy_(1 + 0.1 * torch.rand(n, generator=g))  # type: ignore[operator]


def _pair(**cfg: object) -> tuple[MaskRCNN, TVMaskRCNN]:
    torch.manual_seed(0)
    ours = MaskRCNN(ModelConfig(backbone="resnet50", arch="v2", **cfg))  # type: ignore[arg-type]
    _randomize_norms(ours)
    layers = int(cfg.get("trainable_backbone_layers", 3))  # type: ignore[call-overload]
    tv_cfg = {k: v for k, v in cfg.items() if k not in ("norm", "trainable_backbone_layers")}
    theirs = maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, trainable_backbone_layers=layers, **tv_cfg
    )
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def _targets() -> list[dict[str, torch.Tensor]]:
    m = torch.zeros(2, 240, 320, dtype=torch.uint8)
    m[0, 20:100, 30:150] = 1
    m[1, 120:200, 100:300] = 1
    boxes = torch.tensor([[30.0, 20, 150, 100], [100, 120, 300, 200]])
    return [
        {"boxes": boxes, "labels": torch.tensor([3, 7]), "masks": m},
        {"boxes": boxes[:1] / 2, "labels": torch.tensor([1]), "masks": m[:1, ::2, ::2].clone()},
    ]


def test_state_dicts_load_strictly_both_ways() -> None:
    ours = MaskRCNN(ModelConfig(backbone="resnet50", arch="v2"))
    theirs = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None)
    counter = "num_batches_tracked"
    mine = {k: v.shape for k, v in ours.state_dict().items() if not k.endswith(counter)}
    ref = {k: v.shape for k, v in theirs.state_dict().items() if not k.endswith(counter)}
    assert mine == ref
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key


def test_eval_detections_match_and_the_fast_path_keeps_them() -> None:
    ours, theirs = _pair(box_score_thresh=0.0, **SMALL)
    ours.eval()
    theirs.eval()
    torch.manual_seed(1)
    images = [torch.rand(3, 240, 320), torch.rand(3, 200, 260)]
    with torch.no_grad():
        mine = ours(images)
        reference = theirs(images)
        fast = copy.deepcopy(ours).optimize_for_inference("fp32", channels_last=False)(images)
    for a, b, f in zip(mine, reference, fast, strict=True):
        assert a["boxes"].shape[0] == 100
        assert torch.equal(a["labels"], b["labels"])
        # torchvision's v2 backbone normalises with BatchNorm2d's eval arithmetic, ours with
        # FrozenBatchNorm2d's scale and shift: equal up to float32 rounding over 50 layers
        # (here 1e-3 px on boxes of hundreds of pixels, 3e-6 relative).
        torch.testing.assert_close(a["boxes"], b["boxes"], atol=2e-3, rtol=0)
        torch.testing.assert_close(a["scores"], b["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(a["masks"], b["masks"], atol=1e-3, rtol=0)
        # Folded norms change the arithmetic by float rounding only.
        torch.testing.assert_close(f["boxes"][:20], a["boxes"][:20], atol=1e-2, rtol=0)
        torch.testing.assert_close(f["scores"][:20], a["scores"][:20], atol=1e-3, rtol=0)


def test_train_losses_and_gradients_match() -> None:
    """All stages trainable with BatchNorm (torchvision's v2 backbone norm), batch statistics
    in the FPN and heads: the same five losses and the same gradient on every parameter."""
    ours, theirs = _pair(norm="bn", trainable_backbone_layers=5, **SMALL)
    ours.train()
    theirs.train()
    torch.manual_seed(1)
    images = [torch.rand(3, 240, 320), torch.rand(3, 120, 160)]
    torch.manual_seed(5)
    mine = ours(images, _targets())
    torch.manual_seed(5)  # our samplers draw random numbers exactly as torchvision's do
    ref = theirs(images, _targets())
    assert set(mine) == set(ref)
    for name in ref:
        torch.testing.assert_close(mine[name], ref[name], atol=1e-4, rtol=1e-4)
    sum(mine.values()).backward()
    sum(ref.values()).backward()
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        other = theirs_params[name].grad
        assert other is not None, name
        scale = float(other.abs().max()) + 1e-8
        assert float((param.grad - other).abs().max()) <= 4e-3 * scale, name
