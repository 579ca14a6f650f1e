"""Multi-level RoIAlign against torchvision's MultiScaleRoIAlign."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import initLevelMapper

from maskrcnn.model.pooler import MultiLevelRoIAlign


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


def test_reduced_precision_channels_last_levels_are_read_as_float32() -> None:
    features, boxes, sizes = _case(2)
    low = OrderedDict(
        (k, v.bfloat16().contiguous(memory_format=torch.channels_last)) for k, v in features.items()
    )
    as_float = OrderedDict((k, v.float().contiguous()) for k, v in low.items())
    with torch.no_grad():
        out = MultiLevelRoIAlign(7)(low, boxes, sizes)
    assert out.dtype == torch.float32
    assert torch.equal(out, _torchvision(7)(as_float, boxes, sizes))

