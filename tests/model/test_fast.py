"""The fast inference path: folding is exact, fast outputs stay close to exact ones."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from maskrcnn import MaskRCNN, ModelConfig
from maskrcnn.bench import compare
from maskrcnn.config import from_dict
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.transforms import build_transforms
from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.fast import fold_batchnorm
from maskrcnn.utils.precision import cpu_supports_bf16
from tv_oracle import randomize_frozen_bn


@pytest.mark.parametrize(
    ("name", "count"), [("resnet18", 20), ("resnet50", 53), ("mobilenet_v2", 52), ("vgg16", 0)]
)
def test_folding_batchnorm_keeps_the_features(name: str, count: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone=name)).eval()
    randomize_frozen_bn(backbone)
    folded = copy.deepcopy(backbone)
    assert fold_batchnorm(folded) == count  # every conv+norm pair, and only those
    assert not any(type(m).__name__ == "FrozenBatchNorm2d" for m in folded.modules())
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        a, b = backbone(x), folded(x)
    for key in a:
        scale = a[key].abs().max()
        torch.testing.assert_close(b[key] / scale, a[key] / scale, atol=1e-5, rtol=0)


def test_optimize_for_inference_switches_mode() -> None:
    model = MaskRCNN(ModelConfig(backbone="resnet18", num_classes=3, min_size=64, max_size=96))
    model.train()
    fast = model.optimize_for_inference("fp32")
    assert fast is model and not model.training
    assert model.inference_precision == "fp32" and model.channels_last
    conv = model.backbone.body["conv1"]
    assert isinstance(model.backbone.body["bn1"], nn.Identity) and conv.bias is not None
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="precision"):
        model.optimize_for_inference("int4")
    assert model.optimize_for_inference("fp32") is model  # the same switch again: nothing
    with pytest.raises(ValueError, match="already optimized for fp32"):
        model.optimize_for_inference("bf16")
    with pytest.raises(ValueError, match="can no longer be trained"):
        model.train()
    assert not model.training


def _trained(run: Path, device: str = "cpu") -> tuple[MaskRCNN, list[torch.Tensor]]:
    state = load_checkpoint(run / "last.pth")
    model = MaskRCNN(from_dict(ModelConfig, state["config"]["model"]))
    model.load_state_dict(state["model"])
    data = CocoDataset(
        run / "data" / "train.json", run / "data", transforms=build_transforms(None, train=False)
    )
    images = [data[i][0].as_subclass(torch.Tensor).to(device) for i in range(6)]
    return model.eval().to(device), images


@pytest.mark.parametrize(
    ("device", "precision"), [("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "fp32"), ("cuda", "fp16")]
)
def test_fast_outputs_match_exact_ones(trained_tiny: Path, device: str, precision: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu" and precision == "bf16" and not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    exact, images = _trained(trained_tiny, device)
    fast = copy.deepcopy(exact).optimize_for_inference(precision)
    # bf16 features move an undertrained model's boxes by a few pixels, and now and then
    # one borderline detection elsewhere (the AP of a trained model moves by well under a
    # point: see the README); a decoding or pasting error would drop these far lower.
    bound = {"fp32": (0.99, 0.98, 1e-3), "bf16": (0.85, 0.85, 0.05), "fp16": (0.9, 0.9, 0.02)}[
        precision
    ]
    compared = 0
    total = {"box_iou": 0.0, "mask_iou": 0.0, "score_diff": 0.0}
    with torch.no_grad():
        for ref, out in zip(exact(images), fast(images), strict=True):
            confident = ref["scores"] >= 0.3
            if not confident.any():
                continue
            agreement = compare({k: v[confident] for k, v in ref.items()}, out)
            for key, value in agreement.items():  # weighted by the detections compared
                total[key] += value * int(confident.sum())
            assert out["boxes"].dtype == out["masks"].dtype == torch.float32
            compared += int(confident.sum())
    mean = {k: v / max(compared, 1) for k, v in total.items()}
    assert mean["box_iou"] >= bound[0], mean
    assert mean["mask_iou"] >= bound[1], mean
    assert mean["score_diff"] <= bound[2], mean
    assert compared >= 4
