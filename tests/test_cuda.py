"""The model on a CUDA device: same outputs as torchvision there, fp16 training that agrees
with fp32, pooling and pasting that agree with the CPU. Skipped where PyTorch sees no GPU
(the fast path's agreement with the exact one on CUDA, on a trained model, is in
tests/model/test_fast.py)."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from maskrcnn.bench import compare, training_batch
from maskrcnn.model.pooler import FEATURE_NAMES, MultiLevelRoIAlign
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.utils.precision import autocast, grad_scaler
from tv_oracle import build_pair

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
SMALL = {"min_size": 320, "max_size": 512}


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.rand(3, 240, 320, generator=g).to(CUDA),
        torch.rand(3, 300, 200, generator=g).to(CUDA),
    ]


def test_outputs_match_torchvision_on_cuda() -> None:
    ours, theirs = build_pair(box_score_thresh=0.0, **SMALL)
    ours, theirs = ours.eval().to(CUDA), theirs.eval().to(CUDA)
    with torch.no_grad():
        mine, reference = ours(_images()), theirs(_images())
    for out, ref in zip(mine, reference, strict=True):
        assert out["boxes"].device.type == "cuda" and out["boxes"].shape[0] == 100
        # GPU sums may be ordered differently: match detections rather than slots.
        agreement = compare(ref, out)
        assert agreement["box_iou"] > 0.99, agreement
        assert agreement["mask_iou"] > 0.97, agreement
        assert agreement["score_diff"] < 1e-3, agreement


def test_fp16_training_step_agrees_with_fp32_on_cuda() -> None:
    ours, _ = build_pair(**SMALL)
    model = ours.train().to(CUDA).to(memory_format=torch.channels_last)
    images, targets = training_batch((480, 640), CUDA)
    losses = {}
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)  # the same anchor and proposal samples
        with autocast(precision, CUDA):
            out = model(images, targets)
        losses[precision] = {k: v.item() for k, v in out.items()}
    for name, value in losses["fp32"].items():
        assert abs(losses["fp16"][name] - value) <= 0.05 * abs(value) + 1e-3, (name, losses)
    # Scaled steps: the first ones overflow and are skipped while the scaler lowers its
    # scale (65536 at first); then the weights move and stay finite.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = grad_scaler("fp16", CUDA)
    weight = model.roi_heads.box_predictor.cls_score.weight
    before = weight.detach().clone()
    for _ in range(30):
        with autocast("fp16", CUDA):
            loss = sum(model(images, targets).values())
        assert isinstance(loss, torch.Tensor)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if not torch.equal(before, weight):
            break
    assert not torch.equal(before, weight)
    assert scaler.get_scale() < 65536.0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _levels(device: torch.device) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    sizes = [(60, 80), (30, 40), (15, 20), (8, 10)]
    return OrderedDict(
        (name, torch.rand(1, 8, h, w, generator=g).to(device))
        for name, (h, w) in zip(FEATURE_NAMES, sizes, strict=True)
    )


def test_pooling_on_cuda_matches_cpu() -> None:
    boxes = [
        torch.tensor([[0.0, 0, 20, 30], [10, 5, 300, 200], [100, 50, 140, 90], [-5, -5, 319, 239]])
    ]
    pool = MultiLevelRoIAlign(7)
    cpu = pool(_levels(torch.device("cpu")), boxes)
    gpu = pool(_levels(CUDA), [b.to(CUDA) for b in boxes])
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
    half = OrderedDict(
        (k, v.half().contiguous(memory_format=torch.channels_last))
        for k, v in _levels(CUDA).items()
    )
    torch.testing.assert_close(
        pool(half, [b.to(CUDA) for b in boxes]).float().cpu(), cpu, atol=2e-3, rtol=0
    )


def test_paste_on_cuda_matches_cpu() -> None:
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(20, 1, 28, 28, generator=g)
    xy = torch.rand(20, 2, generator=g) * torch.tensor([250.0, 180.0])
    boxes = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 120 + 2], 1)
    cpu = paste_masks(masks, boxes, (240, 320))
    gpu = paste_masks(masks.to(CUDA), boxes.to(CUDA), (240, 320))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
