"""Masks to polygons: rasterised back by pycocotools, a solid mask comes back pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn.data.polygons import mask_to_polygons

H, W = 60, 80
YY, XX = np.mgrid[:H, :W]


def _back(polygons: list[list[float]]) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, H, W))) > 0


@pytest.mark.parametrize("name, mask, parts", [
    ("square", (YY >= 5) & (YY < 15) & (XX >= 3) & (XX < 13), 1),
    ("disk", (YY - 30) ** 2 + (XX - 40) ** 2 < 15**2, 1),
    ("two blobs", ((YY - 10) ** 2 + (XX - 10) ** 2 < 25) | ((YY - 40) ** 2 + (XX - 60) ** 2 < 64),
     2),
    ("one pixel", (YY == 3) & (XX == 4), 1),
    ("touching the border", (XX < 7) | (YY >= H - 2), 1),
])
def test_solid_masks_come_back_exactly(name: str, mask: np.ndarray, parts: int) -> None:
    polygons = mask_to_polygons(mask)
    assert len(polygons) == parts, name
    assert np.array_equal(_back(polygons), mask), name


def test_vertices_lie_on_pixel_edges_and_straight_runs_are_dropped() -> None:
    square = (YY >= 5) & (YY < 15) & (XX >= 3) & (XX < 13)
    (polygon,) = mask_to_polygons(square)
    points = np.array(polygon).reshape(-1, 2)
    assert len(points) == 8  # four corners, each cut by a quarter-pixel triangle
    assert points[:, 0].min() == 3.0 and points[:, 0].max() == 13.0
    assert points[:, 1].min() == 5.0 and points[:, 1].max() == 15.0


def test_holes_cannot_be_polygons_and_empty_masks_give_none() -> None:
    ring = ((YY - 30) ** 2 + (XX - 40) ** 2 < 225) & ((YY - 30) ** 2 + (XX - 40) ** 2 >= 36)
    (outline,) = mask_to_polygons(ring)  # the outer outline only: the hole comes back filled
    assert np.array_equal(_back([outline]), (YY - 30) ** 2 + (XX - 40) ** 2 < 225)
    assert mask_to_polygons(np.zeros((H, W), dtype=bool)) == []
