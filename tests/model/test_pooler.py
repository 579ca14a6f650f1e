"""Multi-level RoIAlign against torchvision's MultiScaleRoIAlign."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import initLevelMapper

from maskrcnn.model.pooler import MultiLevelRoIAlign, roi_align_gather


def _case(seed: int) -> tuple[OrderedDict[str, torch.Tensor], list[torch.Tensor], list]:
    g = torch.Generator().manual_seed(seed)
    sizes = [(512, 640), (480, 600)]  # padded to 512 x 640: levels of 128 x 160 >> k
    features = OrderedDict(
        (str(k), torch.randn(2, 4, 128 >> k, 160 >> k, generator=g)) for k in range(4)
    )
    boxes = []
    for h, w in sizes:
        xy = torch.rand(70, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = torch.rand(70, 2, generator=g) ** 2 * torch.tensor([w, h]) + 1
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
    return features, boxes, sizes


def _torchvision(size: int) -> MultiScaleRoIAlign:
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=size, sampling_ratio=2)
    pool.scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    pool.map_levels = initLevelMapper(2, 5)
    return pool


@pytest.mark.parametrize("size", [7, 14])
def test_equals_torchvision_sequential_and_threaded(size: int) -> None:
    features, boxes, sizes = _case(0)
    levels = initLevelMapper(2, 5)(boxes)
    assert set(levels.tolist()) == {0, 1, 2, 3}  # every level pools some boxes
    ref = _torchvision(size)(features, boxes, sizes)
    ours = MultiLevelRoIAlign(size)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):  # one thread: sequential; three: each level's boxes split in three
            torch.set_num_threads(n)
            with torch.no_grad():
                assert torch.equal(ours(features, boxes, sizes), ref)
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():  # pooled in worker threads, which inherit the mode
        out = ours(features, boxes, sizes)
    assert torch.equal(out, ref) and out.is_inference()


def test_gradient_flows_like_torchvision() -> None:
    features, boxes, sizes = _case(1)
    ours_in = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
    ref_in = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
    MultiLevelRoIAlign(7)(ours_in, boxes, sizes).square().sum().backward()
    _torchvision(7)(ref_in, boxes, sizes).square().sum().backward()
    for k in features:
        assert torch.allclose(ours_in[k].grad, ref_in[k].grad, atol=1e-5), k


def _channels_last(features: OrderedDict, dtype: torch.dtype = torch.float32) -> OrderedDict:
    return OrderedDict(
        (k, v.to(dtype).contiguous(memory_format=torch.channels_last)) for k, v in features.items()
    )


@pytest.mark.parametrize("size", [7, 14])
def test_channels_last_levels_are_gathered_to_torchvision_values(size: int) -> None:
    features, boxes, sizes = _case(2)
    ref = _torchvision(size)(features, boxes, sizes)
    with torch.inference_mode():
        out = MultiLevelRoIAlign(size)(_channels_last(features), boxes, sizes)
    # The same samples and weights summed in another order: float32 rounding apart.
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, rtol=0, atol=2e-6)
    assert not torch.equal(out, torch.zeros_like(out))


def test_gathered_reduced_precision_levels_stay_in_their_dtype() -> None:
    features, boxes, sizes = _case(3)
    low = _channels_last(features, torch.bfloat16)
    ref = _torchvision(7)(OrderedDict((k, v.float()) for k, v in low.items()), boxes, sizes)
    with torch.no_grad():
        out = MultiLevelRoIAlign(7)(low, boxes, sizes)
    assert out.dtype == torch.bfloat16
    # bf16 weights and output: within a few bf16 roundings of the float32 pooling.
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert (out.float() - ref).abs().mean() < 5e-3


@pytest.mark.parametrize("ratio", [1, 2, 3])
def test_gather_matches_roi_align_at_the_edges(ratio: int) -> None:
    g = torch.Generator().manual_seed(ratio)
    feature = torch.randn(2, 3, 9, 13, generator=g)
    # Boxes across and beyond every edge, thinner than a pixel, and whole-image ones.
    xy = torch.rand(200, 2, generator=g) * torch.tensor([80.0, 60.0]) - 20
    wh = torch.rand(200, 2, generator=g) ** 3 * torch.tensor([90.0, 70.0])
    rois = torch.cat([torch.randint(0, 2, (200, 1), generator=g).float(), xy, xy + wh], 1)
    rois = torch.cat([rois, torch.tensor([[1, 0, 0, 52, 36], [0, 51.9, 35.9, 52, 36.0]])])
    ref = roi_align(feature, rois, 5, 0.25, ratio, aligned=False)
    out = roi_align_gather(
        feature.contiguous(memory_format=torch.channels_last), rois, 5, 0.25, ratio
    )
    assert torch.allclose(out, ref, rtol=0, atol=2e-6)


def test_gathered_levels_pass_torchvision_gradients_back() -> None:
    features, boxes, sizes = _case(4)
    ref_in = OrderedDict((k, v.clone().requires_grad_()) for k, v in features.items())
    _torchvision(7)(ref_in, boxes, sizes).square().sum().backward()
    for dtype in (torch.float32, torch.bfloat16):
        levels = OrderedDict(
            (k, v.requires_grad_()) for k, v in _channels_last(features, dtype).items()
        )
        out = MultiLevelRoIAlign(7)(levels, boxes, sizes)
        assert out.dtype == torch.float32  # read as float32 while gradients are needed
        out.square().sum().backward()
        for k, v in levels.items():
            assert v.grad is not None and v.grad.dtype == dtype, k
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the inputs and the grads
            assert torch.allclose(v.grad.float(), ref_in[k].grad, rtol=tol, atol=tol), k


def test_adaptive_sampling_is_refused() -> None:
    with pytest.raises(ValueError, match="sampling_ratio"):
        MultiLevelRoIAlign(7, sampling_ratio=0)


def test_layout_is_judged_on_the_finest_level() -> None:
    # A 1x1 level is "channels-last" and "contiguous" at once: the finest level decides, so
    # reduced-precision NCHW levels all go to torchvision's kernels as float32.
    g = torch.Generator().manual_seed(5)
    features = OrderedDict(
        (str(k), torch.randn(1, 4, 8 >> k, 8 >> k, generator=g).bfloat16()) for k in range(4)
    )
    assert features["3"].is_contiguous(memory_format=torch.channels_last)
    boxes = [torch.tensor([[0.0, 0.0, 32.0, 32.0], [1.0, 2.0, 9.0, 7.0], [0, 0, 500, 500]])]
    as_float = OrderedDict((k, v.float()) for k, v in features.items())
    with torch.no_grad():
        out = MultiLevelRoIAlign(7)(features, boxes, [(32, 32)])
    assert out.dtype == torch.float32
    assert torch.equal(out, _torchvision(7)(as_float, boxes, [(32, 32)]))
