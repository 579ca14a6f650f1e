"""The normalisation choices of the trainable backbone stages (ModelConfig.norm)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn import MaskRCNN, ModelConfig
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.norms import batchnorm_from, groupnorm_from, sync_batchnorm

SMALL = {"min_size": 96, "max_size": 128, "box_score_thresh": 0.0}


def _count(module: nn.Module, kind: type[nn.Module]) -> int:
    return sum(type(m) is kind for m in module.modules())


def _frozen(seed: int, channels: int = 48) -> FrozenBatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = FrozenBatchNorm2d(channels)
    bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
    bn.bias.copy_(torch.randn(channels, generator=g))
    bn.running_mean.copy_(torch.randn(channels, generator=g))
    bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def test_batchnorm_from_a_frozen_norm_computes_the_same_in_eval_mode() -> None:
    frozen = _frozen(0)
    bn = batchnorm_from(frozen).eval()
    x = torch.randn(2, 48, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(bn(x), frozen(x))
    assert all(p.requires_grad for p in bn.parameters())


def test_groupnorm_takes_the_scale_and_shift_and_divides_the_channels() -> None:
    frozen = _frozen(0, channels=24)  # 24 does not divide by 32: gcd(32, 24) = 8 groups
    gn = groupnorm_from(frozen)
    assert gn.num_groups == 8
    torch.testing.assert_close(gn.weight.detach(), frozen.weight)
    torch.testing.assert_close(gn.bias.detach(), frozen.bias)


@pytest.mark.parametrize(("trainable", "bn_count"), [(0, 0), (3, 43), (4, 51), (5, 52)])
def test_only_the_trainable_stages_get_the_chosen_norm(trainable: int, bn_count: int) -> None:
    # MobileNetV2 has 52 norms: stem 1, C2 8, C3 9, C4 21, C5 13.
    backbone = build_backbone(
        ModelConfig(backbone="mobilenet_v2", norm="bn", trainable_backbone_layers=trainable)
    )
    assert _count(backbone.body, nn.BatchNorm2d) == bn_count
    norms = [m for m in backbone.body.modules() if isinstance(m, (nn.BatchNorm2d,
                                                                  FrozenBatchNorm2d))]
    assert len(norms) == 52
    for m in backbone.body.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert all(p.requires_grad for p in m.parameters())


def test_resnet_stages_frozen_by_the_count_keep_frozen_norms() -> None:
    backbone = build_backbone(ModelConfig(backbone="resnet18", norm="bn"))  # 3 trainable
    body = backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert type(body.layer2[0].bn1) is nn.BatchNorm2d
    assert type(body.layer4[1].bn2) is nn.BatchNorm2d
    assert not any(p.requires_grad for p in body.layer1.parameters())


def test_bn_model_loads_torchvision_state_dicts_both_ways_and_agrees_in_eval() -> None:
    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, **SMALL)
    ours = MaskRCNN(ModelConfig(num_classes=3, norm="bn", **SMALL))
    ours.load_state_dict(tv.state_dict())  # strict: num_batches_tracked is filled in
    with torch.no_grad():  # training moves the statistics: they must travel back
        for m in ours.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1)
    tv.load_state_dict(ours.state_dict())  # strict: torchvision drops num_batches_tracked
    tv.eval()
    ours.eval()
    image = [torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(2))]
    with torch.no_grad():
        a, b = ours(image)[0], tv(image)[0]
    torch.testing.assert_close(a["boxes"], b["boxes"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-4)


def test_bn_normalises_by_batch_statistics_in_training_and_updates_running_ones() -> None:
    model = MaskRCNN(ModelConfig(backbone="mobilenet_v2", norm="bn", num_classes=3, **SMALL))
    norm = model.backbone.body["18"][1]
    assert type(norm) is nn.BatchNorm2d
    before = norm.running_mean.clone()
    body = model.backbone.body.train()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        alone = body(a)["3"]
        together = body(torch.cat([a, b]))["3"][:1]
    assert not torch.allclose(alone, together, atol=1e-3)  # the batch changes the result
    assert not torch.equal(norm.running_mean, before)
    body.eval()
    with torch.no_grad():  # eval mode: each image alone, whatever the batch
        torch.testing.assert_close(body(a)["3"], body(torch.cat([a, b]))["3"][:1])


def test_gn_normalises_each_image_alone_in_training() -> None:
    torch.manual_seed(0)
    model = MaskRCNN(ModelConfig(backbone="resnet18", norm="gn", num_classes=3, **SMALL))
    assert _count(model, nn.GroupNorm) > 0 and _count(model, nn.BatchNorm2d) == 0
    assert not any("running_mean" in k for k in model.state_dict() if "layer4" in k)
    body = model.backbone.body.train()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(1, 3, 64, 64, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(body(a)["3"], body(torch.cat([a, b]))["3"][:1])


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_fast_path_folds_batchnorm_and_keeps_groupnorm(norm: str) -> None:
    torch.manual_seed(0)
    model = MaskRCNN(ModelConfig(backbone="resnet18", norm=norm, num_classes=3, **SMALL))
    with torch.no_grad():  # statistics away from the ImageNet-free defaults
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    fast = copy.deepcopy(model).optimize_for_inference("fp32", channels_last=False)
    assert _count(fast, nn.BatchNorm2d) == 0 and _count(fast, FrozenBatchNorm2d) == 0
    assert _count(fast, nn.GroupNorm) == _count(model, nn.GroupNorm)
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        a, b = model(image)[0], fast(image)[0]
    torch.testing.assert_close(a["scores"][:20], b["scores"][:20], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(a["boxes"][:20], b["boxes"][:20], rtol=1e-3, atol=1e-2)


def test_syncbn_converts_on_cuda_and_refuses_several_cpu_processes() -> None:
    model = MaskRCNN(ModelConfig(backbone="mobilenet_v2", norm="syncbn", num_classes=3))
    count = _count(model, nn.BatchNorm2d)
    sync_batchnorm(model, torch.device("cpu"), world_size=1)  # one process: plain BN
    assert _count(model, nn.BatchNorm2d) == count
    with pytest.raises(ValueError, match=r"CUDA only.*model\.norm=bn"):
        sync_batchnorm(model, torch.device("cpu"), world_size=2)
    sync_batchnorm(model, torch.device("cuda"), world_size=2)  # converting needs no GPU
    assert _count(model, nn.SyncBatchNorm) == count and _count(model, nn.BatchNorm2d) == 0


def test_norm_choices_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="vgg16 has no normalisation layers"):
        ModelConfig(backbone="vgg16", norm="bn")


@pytest.mark.parametrize("norm", ["frozen", "bn", "syncbn", "gn"])
def test_state_dict_round_trip_of_each_norm(norm: str) -> None:
    cfg = ModelConfig(backbone="mobilenet_v2", norm=norm, num_classes=3, **SMALL)
    torch.manual_seed(0)
    trained = MaskRCNN(cfg)
    with torch.no_grad():  # as if training had moved every norm away from its start
        for m in trained.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)):
                m.weight.mul_(1.1)
    torch.manual_seed(1)
    fresh = MaskRCNN(cfg)
    fresh.load_state_dict(trained.state_dict())  # strict
    image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        a, b = trained.eval()(image)[0], fresh.eval()(image)[0]
    torch.testing.assert_close(a["scores"], b["scores"])
    keys = trained.state_dict().keys()
    assert any(k.endswith("num_batches_tracked") for k in keys) == (norm in ("bn", "syncbn"))
