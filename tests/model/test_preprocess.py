"""Resizing before the network: sizes, targets, and the export graph's own size arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from maskrcnn import ModelConfig
from maskrcnn.export.graph import traced_resized_size
from maskrcnn.model.preprocess import (
    Preprocessor,
    resize_image,
    resize_masks,
    resize_scale,
    resized_size,
)

SHAPES = [(64, 64), (50, 70), (37, 300), (1, 300), (300, 1), (3, 3000), (2000, 4), (1, 1)]


def test_a_very_wide_or_tall_image_keeps_a_side_of_at_least_one() -> None:
    """At min = max = 96 a 1 x 300 strip scales by 0.32: floor(0.32) = 0 rows, which
    interpolate refuses; the side is kept at 1 and the boxes follow the real sizes."""
    pre = Preprocessor(ModelConfig(min_size=96, max_size=96))
    masks = torch.zeros(1, 1, 300, dtype=torch.uint8)
    masks[0, 0, 30:150] = 1
    targets = [
        {"boxes": torch.tensor([[30.0, 0.0, 150.0, 1.0]]), "masks": masks},
        {"boxes": torch.tensor([[0.0, 60.0, 2.0, 120.0]]), "masks": torch.ones(1, 300, 2).byte()},
    ]
    batch, resized = pre([torch.rand(3, 1, 300), torch.rand(3, 300, 2)], targets, False)
    assert resized is not None
    assert batch.image_sizes == [(1, 96), (96, 1)]
    assert batch.original_sizes == [(1, 300), (300, 2)]
    assert tuple(batch.tensor.shape) == (2, 3, 96, 96)
    torch.testing.assert_close(resized[0]["boxes"], torch.tensor([[9.6, 0.0, 48.0, 1.0]]))
    torch.testing.assert_close(resized[1]["boxes"], torch.tensor([[0.0, 19.2, 1.0, 38.4]]))
    assert resized[0]["masks"].shape == (1, 1, 96) and resized[1]["masks"].shape == (1, 96, 1)
    assert int(resized[0]["masks"].sum()) == 48 - 10  # columns 30..149 scaled by 0.32


@pytest.mark.parametrize("shape", [(50, 70), (37, 300), (96, 64)])
def test_resize_equals_interpolate_with_a_recomputed_scale_factor(
    shape: tuple[int, int],
) -> None:
    """Where no side would be 0, the sizes and values are torchvision's, bit for bit."""
    scale = resize_scale(*shape, 96, 160)
    image = torch.rand(3, *shape, generator=torch.Generator().manual_seed(0))
    reference = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                              recompute_scale_factor=True, align_corners=False)[0]
    assert torch.equal(resize_image(image, scale), reference)
    masks = (image[:2] > 0.5).byte()
    expected = F.interpolate(masks[:, None].float(), scale_factor=scale,
                             recompute_scale_factor=True)[:, 0].byte()
    assert torch.equal(resize_masks(masks, scale), expected)
    assert resize_masks(masks[:0], scale).shape == (0, *expected.shape[-2:])


@pytest.mark.parametrize("shape", SHAPES)
def test_the_export_graph_resizes_to_the_same_size(shape: tuple[int, int]) -> None:
    expected = resized_size(*shape, resize_scale(*shape, 96, 96))
    assert min(expected) >= 1
    assert traced_resized_size(torch.zeros(3, *shape), 96.0, 96.0) == expected
