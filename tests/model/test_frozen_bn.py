"""Frozen BatchNorm applied inside the convolution in training."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.config import ModelConfig
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.frozen_bn import ConvFrozenBN, FusedFrozenBatchNorm2d, fuse_for_training


def _pair(seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    bn = FrozenBatchNorm2d(8)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        bn.weight.copy_(torch.rand(8, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(8, generator=g))
        bn.running_mean.copy_(torch.randn(8, generator=g))
        bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return nn.Sequential(conv, bn, nn.ReLU())


def test_fused_pair_trains_like_the_plain_one() -> None:
    plain = _pair(0)
    fused = copy.deepcopy(plain)
    assert fuse_for_training(fused) == 1
    assert type(fused[0]) is ConvFrozenBN and type(fused[1]) is FusedFrozenBatchNorm2d
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for model in (plain, fused):
        model.train()
        model(x).square().sum().backward()
    assert torch.allclose(fused(x), plain(x), rtol=1e-5, atol=1e-5)
    assert torch.allclose(fused[0].weight.grad, plain[0].weight.grad, rtol=1e-4, atol=1e-4)
    fused.eval()  # in eval, the modules compute what they did before, op for op
    plain.eval()
    assert torch.equal(fused(x), plain(x))


def test_norms_put_in_eval_mode_alone_apply_once() -> None:
    """``for m in model.modules(): if isinstance(m, FrozenBatchNorm2d): m.eval()`` (a common
    idiom) must not apply the norm twice, nor a conv in eval mode skip it."""
    plain = _pair(0).eval()
    fused = copy.deepcopy(plain)
    fuse_for_training(fused)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = plain(x)
    fused.train()
    fused[1].eval()
    assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-5)
    fused.train()
    fused[0].eval()
    assert torch.allclose(fused(x), expected, rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(fused.train())  # the pair stays linked in a copy
    assert copied[1].__dict__["conv"] is copied[0] and copied[0].__dict__["norm"] is copied[1]
    assert torch.allclose(copied(x), expected, rtol=1e-5, atol=1e-5)


def test_backbone_features_equal_in_train_and_eval_modes() -> None:
    torch.manual_seed(0)
    for name in ("resnet18", "mobilenet_v2"):
        backbone = build_backbone(ModelConfig(backbone=name, num_classes=3))
        norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
        assert norms and all(isinstance(m, FusedFrozenBatchNorm2d) for m in norms), name
        for m in norms:  # stats that make a missed or doubled norm show
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
        x = torch.rand(1, 3, 96, 128)
        with torch.no_grad():
            train = backbone.train()(x)
            evaluated = backbone.eval()(x)
        for k in evaluated:
            scale = evaluated[k].abs().max()
            assert (train[k] - evaluated[k]).abs().max() <= 1e-5 * scale, (name, k)
