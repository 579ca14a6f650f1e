"""Vectorised mask paste against torchvision's per-mask loop."""

from __future__ import annotations

import subprocess
import sys

import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from maskrcnn.model.postprocess import paste_masks, paste_masks_dense, zeros_lazy


def _random_case(n: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, 1, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 1.0, h * 1.0]) - torch.tensor(
        [w * 0.1, h * 0.1]
    )  # some boxes start left of or above the image
    wh = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5]) + torch.tensor(
        [w * 0.15, h * 0.15]
    )  # every box overlaps the image (torchvision fails otherwise)
    return masks, torch.cat([xy, xy + wh], dim=1)


def test_paste_matches_torchvision() -> None:
    masks, boxes = _random_case(60, 217, 303, seed=0)
    boxes[0] = torch.tensor([-20.0, -15.0, 50.0, 40.0])  # partly outside, top-left
    boxes[1] = torch.tensor([280.0, 200.0, 340.0, 260.0])  # partly outside, bottom-right
    boxes[2] = torch.tensor([10.0, 10.0, 10.4, 10.2])  # sub-pixel box
    ours = paste_masks(masks, boxes, (217, 303))
    ref = paste_masks_in_image(masks, boxes, (217, 303))
    assert ours.shape == ref.shape == (60, 1, 217, 303)
    assert (ours - ref).abs().mean().item() <= 1e-3
    assert (ours - ref).abs().max().item() <= 1e-5  # the same arithmetic, up to rounding
    a, b = ours > 0.5, ref > 0.5
    iou = (a & b).sum().item() / max((a | b).sum().item(), 1)
    assert iou >= 0.99


def test_dense_paste_equals_windowed_paste() -> None:
    # The GPU's (and the ONNX graph's) form: the same weights over whole images.
    masks, boxes = _random_case(40, 100, 160, seed=5)
    boxes[0] = torch.tensor([-30.0, -20.0, 20.0, 15.0])
    boxes[1] = torch.tensor([150.0, 90.0, 200.0, 130.0])
    dense = paste_masks_dense(masks, boxes, (100, 160))
    torch.testing.assert_close(dense, paste_masks(masks, boxes, (100, 160)), atol=1e-6, rtol=0)
    assert paste_masks_dense(masks[:0], boxes[:0], (100, 160)).shape == (0, 1, 100, 160)


def test_windows_shared_by_boxes_of_different_shapes() -> None:
    # Pasted two at a time, a tall box and a wide one share a window as tall as the first
    # and as wide as the second; near the image's far edges the window must shift inward.
    masks = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    boxes = torch.tensor(
        [[290.0, 5, 300, 200], [10, 200, 290, 215], [0, 0, 5, 5], [150, 100, 160, 110]]
    )
    for group in (1, 2, 4):
        ours = paste_masks(masks, boxes, (217, 303), group=group)
        ref = paste_masks_in_image(masks, boxes, (217, 303))
        assert (ours - ref).abs().max().item() <= 1e-5, group


def test_output_is_an_ordinary_writable_tensor() -> None:
    masks = torch.ones(3, 1, 28, 28)
    boxes = torch.tensor([[10.0, 10, 20, 20], [0, 0, 59, 49], [30, 5, 31, 6]])
    out = paste_masks(masks, boxes, (50, 60))
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert out[0, 0, 30:, :].sum().item() == 0.0  # untouched pages read as zeros
    out += 1  # writable everywhere
    assert out.min().item() >= 1.0


def test_lazy_zeros_are_zeros_and_writable() -> None:
    big = zeros_lazy((3, 1, 1024, 1024), torch.float32, torch.device("cpu"))  # 12 MiB: mapped
    small = zeros_lazy((3, 1, 8, 8), torch.float32, torch.device("cpu"))
    for t in (big, small):
        assert t.dtype == torch.float32 and t.is_contiguous() and t.abs().sum().item() == 0.0
        t[1, 0, -1, -1] = 2.0
        assert t.sum().item() == 2.0


def test_box_outside_the_image_pastes_nothing() -> None:
    # torchvision's loop raises on such a box; detections are clipped, other callers may not be
    masks = torch.ones(2, 1, 28, 28)
    boxes = torch.tensor([[400.0, 10, 450, 60], [-90.0, -90, -10, -10]])
    assert paste_masks(masks, boxes, (100, 120)).abs().sum().item() == 0.0


def test_paste_of_nothing() -> None:
    out = paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), (50, 60))
    assert out.shape == (0, 1, 50, 60)


PEAK_SCRIPT = """
import resource, torch
from maskrcnn.model.postprocess import paste_masks
masks = torch.rand(100, 1, 28, 28)
boxes = torch.tensor([[0.0, 0.0, 1300.0, 1300.0]]).repeat(100, 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = paste_masks(masks, boxes, (1333, 1333))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, out.numel() * out.element_size())
"""


def test_paste_memory_is_bounded_by_the_output() -> None:
    # A fresh process, so that the peak resident size measures this paste alone.
    res = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, check=True
    )
    growth, output_bytes = map(int, res.stdout.split())
    assert growth < 1.2 * output_bytes, (growth, output_bytes)
