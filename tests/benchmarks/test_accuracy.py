"""The accuracy benchmark's torchvision contender: torchvision's classes, our architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.ops import FrozenBatchNorm2d

from bench_scripts import load_benchmark
from maskrcnn import MaskRCNN, ModelConfig
from maskrcnn.data.synthetic import make_synthetic_coco

accuracy = load_benchmark("accuracy")
SMALL = {"min_size": 96, "max_size": 128, "box_score_thresh": 0.0, "num_classes": 4}


def _target() -> list[dict[str, torch.Tensor]]:
    masks = torch.zeros(1, 100, 120, dtype=torch.uint8)
    masks[0, 20:80, 10:90] = 1
    return [{"boxes": torch.tensor([[10.0, 20.0, 90.0, 80.0]]), "labels": torch.tensor([2]),
             "masks": masks}]


@pytest.mark.parametrize(("backbone", "norm", "trainable"),
                         [("mobilenet_v2", "bn", 5), ("mobilenet_v2", "bn", 2),
                          ("resnet18", "gn", 3), ("resnet18", "frozen", 3)])
def test_twin_has_our_losses_and_detections(backbone: str, norm: str, trainable: int) -> None:
    torch.manual_seed(0)
    ours = MaskRCNN(ModelConfig(backbone=backbone, norm=norm,
                                trainable_backbone_layers=trainable, **SMALL))
    theirs = accuracy.torchvision_twin(ours)
    assert type(theirs) is TVMaskRCNN
    assert [n for n, p in theirs.named_parameters() if p.requires_grad] == [
        n for n, p in ours.named_parameters() if p.requires_grad
    ]
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in ours.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in theirs.modules()) == frozen
    image = [torch.rand(3, 100, 120, generator=torch.Generator().manual_seed(1))]
    ours.train()
    theirs.train()
    torch.manual_seed(2)
    a = ours(image, _target())
    torch.manual_seed(2)
    b = theirs(image, _target())
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        da, db = ours(image)[0], theirs(image)[0]
    torch.testing.assert_close(da["scores"][:20], db["scores"][:20], rtol=1e-4, atol=1e-5)


def test_benchmark_runs_every_contender_and_writes_results(tmp_path: Path) -> None:
    make_synthetic_coco(tmp_path / "data", 6, size=64, seed=0, split_name="train")
    make_synthetic_coco(tmp_path / "data", 2, size=64, seed=1, split_name="val")
    d = tmp_path / "data"
    code = accuracy.main([
        "--train-json", str(d / "train.json"), "--train-images", str(d),
        "--val-json", str(d / "val.json"), "--val-images", str(d),
        "--out", str(tmp_path / "out"), "--repeats", "1", "--recipe-iters", "2",
        "--set", "model.min_size=64", "--set", "model.max_size=64",
        "--set", "data.num_workers=0", "--set", "data.batch_size=2",
        "model.fpn_channels=32", "solver.max_iter=2", "solver.warmup_iters=1", "solver.steps=[1]",
    ])
    assert code == 0
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in ("torchvision", "ours", "recipe"):
        (run,) = report["results"][name]
        assert 0.0 <= run["mask_ap"] <= 1.0 and run["train_s"] > 0
    assert report["results"]["recipe"][0]["iterations"] == 2
    assert report["shared_settings"]["model"]["norm"] == "bn"


def test_norm_layer_of_each_choice() -> None:
    assert accuracy._norm_layer("bn") is nn.BatchNorm2d
    assert accuracy._norm_layer("frozen") is FrozenBatchNorm2d
    assert accuracy._norm_layer("gn")(24).num_groups == 8
