"""Early-stopping class-wise NMS against torchvision's batched_nms."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from maskrcnn.model.postprocess import best_after_nms


def _candidates(n: int, classes: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 80 + 4], 1)
    scores = torch.rand(n, generator=g)
    scores[: n // 10] = 0.5  # ties, also across the first prefix's boundary
    labels = torch.randint(0, classes, (n,), generator=g)
    return boxes, scores, labels


@pytest.mark.parametrize(
    ("n", "classes", "k"),
    [(5000, 90, 100), (3000, 3, 100), (900, 1, 300), (40, 5, 100), (0, 5, 100)],
)
def test_equals_batched_nms_then_top_k(n: int, classes: int, k: int) -> None:
    boxes, scores, labels = _candidates(n, classes, seed=n + classes)
    ref = batched_nms(boxes, scores, labels, 0.5)[:k]
    ours = best_after_nms(boxes, scores, labels, 0.5, k)
    assert torch.equal(ours, ref)


def test_more_candidates_when_the_best_are_suppressed() -> None:
    # 2,000 near-copies of one box outscore everything else: the first prefix keeps only
    # one of them, so the search has to widen to find the other 99.
    boxes, scores, labels = _candidates(3000, 4, seed=1)
    boxes[:2000] = torch.tensor([10.0, 10, 60, 60]) + torch.rand(2000, 1) * 0.1
    scores[:2000] = 2 + torch.rand(2000)
    ref = batched_nms(boxes, scores, labels, 0.5)[:100]
    assert torch.equal(best_after_nms(boxes, scores, labels, 0.5, 100), ref)
