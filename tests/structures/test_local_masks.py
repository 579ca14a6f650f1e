"""Box-local masks: their RLE is pycocotools' RLE of the dense mask, dense and local forms
convert both ways, polygons and overlays come out at the image's coordinates."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch

from maskrcnn.data.polygons import mask_to_polygons
from maskrcnn.structures.local_masks import LocalMasks, crop_to_rle
from maskrcnn.utils.malloc import release_freed_memory
from maskrcnn.utils.visualize import draw_instances


def _dense_rles(masks: torch.Tensor) -> list[str]:
    array = np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8))
    return [r["counts"].decode() for r in mask_utils.encode(array)]


def test_rle_from_crops_equals_pycocotools_on_random_masks() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        h, w = (int(v) for v in torch.randint(1, 40, (2,), generator=g))
        masks = torch.rand(4, h, w, generator=g) > torch.rand(1, generator=g)
        if trial % 5 == 0:
            masks[1] = True  # the whole image: runs continue from column to column
        masks[2] = False  # empty
        masks[3] = False
        masks[3, -1, -1] = True  # the last pixel alone: the RLE ends on a run of ones
        local = LocalMasks.from_dense(masks)
        assert [r["counts"] for r in local.rles()] == _dense_rles(masks)
        assert all(r["size"] == [h, w] for r in local.rles())
        assert torch.equal(local.to_dense(), masks)


def test_crops_are_cut_to_the_mask_and_know_their_place() -> None:
    masks = torch.zeros(2, 10, 12, dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    local = LocalMasks.from_dense(masks)
    assert local.crops[0].shape == (3, 6) and local.origins[0].tolist() == [3, 2]
    assert local.crops[1].shape == (0, 0)
    assert local.areas().tolist() == [18, 0]
    assert local.select([0]).rles()[0] == local.rle(0)
    # A crop placed anywhere: the same RLE as the dense mask it stands for.
    crop = torch.tensor([[1, 0], [1, 1]], dtype=torch.bool)
    dense = torch.zeros(1, 6, 5, dtype=torch.bool)
    dense[0, 4:6, 3:5] = crop
    assert crop_to_rle(crop, (3, 4), (6, 5))["counts"] == _dense_rles(dense)[0]


def test_a_crop_leaving_the_image_is_refused() -> None:
    with pytest.raises(ValueError, match="leaves the 5x5 image"):
        LocalMasks([torch.ones(3, 3, dtype=torch.bool)], torch.tensor([[3, 0]]), (5, 5))


def test_polygons_and_overlays_of_a_crop_are_those_of_its_dense_mask() -> None:
    masks = torch.zeros(2, 40, 50, dtype=torch.bool)
    masks[0, 5:20, 10:30] = True
    masks[0, 8:12, 14:18] = False
    masks[1, 25:40, 35:50] = True  # at the image's corner: its edge is not an outline
    local = LocalMasks.from_dense(masks)
    for k, (crop, origin) in enumerate(local):
        assert mask_to_polygons(crop.numpy(), origin) == mask_to_polygons(masks[k].numpy())
    image = torch.full((3, 40, 50), 120, dtype=torch.uint8)
    boxes = torch.tensor([[10.0, 5, 30, 20], [35, 25, 50, 40]])
    labels = torch.tensor([1, 2])
    dense = np.asarray(draw_instances(image, boxes, labels, None, masks))
    boxed = np.asarray(draw_instances(image, boxes, labels, None, local))
    assert np.array_equal(dense, boxed)


def test_release_freed_memory_calls_glibc() -> None:
    assert release_freed_memory() is True  # Linux with glibc, as CI runs
