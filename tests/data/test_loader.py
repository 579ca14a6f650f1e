"""Loader: collate format, orientation grouping, seeded shuffling, distributed splits."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, SequentialSampler, Subset
from torchvision import tv_tensors

from maskrcnn.data.loader import (
    LANDSCAPE,
    PORTRAIT,
    GroupedBatchSampler,
    build_loader,
    collate,
    dataset_aspect_ratios,
    orientation_groups,
    set_epoch,
)

# 11 landscape (or square) and 7 portrait images, interleaved.
SIZES = [(20, 30), (30, 20), (24, 24), (20, 36), (40, 16), (18, 30), (30, 18), (16, 40),
         (20, 30), (20, 28), (36, 20), (24, 32), (32, 24), (20, 40), (40, 20), (22, 30),
         (30, 22), (26, 28)]


def make_target(n: int, height: int, width: int, image_id: Any) -> dict[str, Any]:
    masks = torch.zeros(n, height, width, dtype=torch.uint8)
    masks[:, 2:6, 3:9] = 1
    boxes = torch.tensor([[3.0, 2.0, 9.0, 6.0]]).repeat(n, 1)
    return {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.ones(n, dtype=torch.int64),
        "masks": tv_tensors.Mask(masks),
        "iscrowd": torch.zeros(n, dtype=torch.int64),
        "area": torch.full((n,), 24.0),
        "image_id": image_id,
    }


class ToyDataset(Dataset[Any]):
    """Image i is SIZES[i] (height, width), id 100 + i; target "noise" is one torch.rand draw."""

    def __init__(self, sizes: list[tuple[int, int]] = SIZES) -> None:
        self.sizes = sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        height, width = self.sizes[index]
        image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
        target = make_target(index % 3, height, width, 100 + index)
        target["noise"] = torch.rand(1)
        return image, target


class RatioDataset(ToyDataset):
    def aspect_ratios(self) -> list[float]:
        return [w / h for h, w in self.sizes]


def ids_of(loader: Any) -> list[list[int]]:
    return [[t["image_id"] - 100 for t in targets] for _, targets in loader]


def test_collate_gives_torchvision_model_input() -> None:
    sample_a = (tv_tensors.Image(torch.zeros(3, 20, 30, dtype=torch.uint8)),
                make_target(2, 20, 30, torch.tensor(5)))
    sample_b = (tv_tensors.Image(torch.ones(3, 16, 12)), make_target(0, 16, 12, 6))
    sample_a[1]["masks"] = tv_tensors.Mask(sample_a[1]["masks"].bool())
    images, targets = collate([sample_a, sample_b])
    assert [type(im) for im in images] == [torch.Tensor, torch.Tensor]
    assert [im.shape for im in images] == [(3, 20, 30), (3, 16, 12)]
    assert [t["image_id"] for t in targets] == [5, 6] and type(targets[0]["image_id"]) is int
    for target, n, (h, w) in zip(targets, (2, 0), ((20, 30), (16, 12)), strict=True):
        assert type(target["boxes"]) is torch.Tensor and type(target["masks"]) is torch.Tensor
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].shape == (n,)
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, h, w)
        assert target["iscrowd"].shape == (n,)
    assert targets[0]["masks"].sum() == 2 * 24


def test_orientation_groups() -> None:
    assert orientation_groups([1.5, 1.0, 0.5]) == [LANDSCAPE, LANDSCAPE, PORTRAIT]


def test_aspect_ratios_from_method_callable_subset_or_images() -> None:
    expected = [w / h for h, w in SIZES]
    assert dataset_aspect_ratios(RatioDataset()) == expected
    assert dataset_aspect_ratios(ToyDataset(), lambda i: expected[i]) == expected
    assert dataset_aspect_ratios(ToyDataset()) == expected  # loads every image
    assert dataset_aspect_ratios(Subset(RatioDataset(), [4, 0])) == [expected[4], expected[0]]


@pytest.mark.parametrize("drop_last", [False, True])
def test_grouping_keeps_one_orientation_per_batch(drop_last: bool) -> None:
    dataset = RatioDataset()
    groups = orientation_groups(dataset.aspect_ratios())
    assert groups.count(PORTRAIT) == 7
    loader = build_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=1,
                          drop_last=drop_last)
    batches = ids_of(loader)
    assert len(batches) == len(loader) == (4 if drop_last else math.ceil(18 / 4))
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    if drop_last:
        assert all(len(b) == 4 for b in batches) and not mixed
    else:  # every image exactly once; only the end-of-epoch remainders may mix
        assert sorted(i for b in batches for i in b) == list(range(18))
        assert len(mixed) <= 1 and all(len(b) == 4 for b in batches[:-1])


def test_without_grouping_batches_follow_the_sampler() -> None:
    loader = build_loader(RatioDataset(), batch_size=5, shuffle=False, num_workers=0,
                          aspect_ratio_grouping=False)
    assert ids_of(loader) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17]]


def test_seeded_shuffling_is_reproducible() -> None:
    def epochs(seed: int) -> list[list[list[int]]]:
        loader = build_loader(RatioDataset(), batch_size=3, shuffle=True, num_workers=0, seed=seed)
        out = []
        for epoch in range(2):
            set_epoch(loader, epoch)
            out.append(ids_of(loader))
        return out

    first = epochs(5)
    assert first == epochs(5)
    assert first[0] != first[1]  # set_epoch reshuffles
    assert first != epochs(6)


@pytest.mark.parametrize("grouping", [False, True])
def test_distributed_sampler_splits_indices_across_ranks(grouping: bool) -> None:
    dataset = RatioDataset(SIZES[:16])
    per_rank = []
    for rank in (0, 1):
        loader = build_loader(dataset, batch_size=2, shuffle=True, num_workers=0, seed=2,
                              distributed=True, num_replicas=2, rank=rank,
                              aspect_ratio_grouping=grouping)
        set_epoch(loader, 3)
        batches = ids_of(loader)
        assert len(batches) == len(loader) == 4  # equal counts: no rank waits at the end
        per_rank.append({i for b in batches for i in b})
    assert per_rank[0].isdisjoint(per_rank[1])
    if not grouping:
        assert per_rank[0] | per_rank[1] == set(range(16))


def test_workers_are_seeded_reproducibly() -> None:
    def noise(seed: int) -> list[float]:
        loader = build_loader(ToyDataset(), batch_size=6, shuffle=False, num_workers=2, seed=seed,
                              aspect_ratio_grouping=False)
        assert loader.persistent_workers
        return [t["noise"].item() for _, targets in loader for t in targets]

    first = noise(3)
    assert first == noise(3)
    assert first != noise(4)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.integers(0, 2), min_size=1, max_size=40),
    batch_size=st.integers(1, 6),
    drop_last=st.booleans(),
)
def test_grouped_batch_sampler_invariants(groups: list[int], batch_size: int,
                                          drop_last: bool) -> None:
    sampler = GroupedBatchSampler(SequentialSampler(groups), groups, batch_size, drop_last)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    mixed = [b for b in batches if len({groups[i] for i in b}) > 1]
    if drop_last:
        assert all(len(b) == batch_size for b in batches) and not mixed
        # Only the end-of-epoch remainders (< batch_size per group) may be left out.
        missed = len(groups) - len({i for b in batches for i in b})
        assert missed <= len(set(groups)) * (batch_size - 1)
    else:  # as BatchSampler: every index exactly once; the remainders may mix groups
        assert sorted(i for b in batches for i in b) == list(range(len(groups)))
        assert all(len(b) == batch_size for b in batches[:-1])
        assert len(mixed) < len(set(groups))


def test_every_image_once_without_drop_last_and_a_clear_error_without_a_batch() -> None:
    groups = [0] * 5 + [1] * 3
    batches = list(GroupedBatchSampler(SequentialSampler(groups), groups, 4, drop_last=False))
    assert batches == [[0, 1, 2, 3], [5, 6, 7, 4]]  # the remainders of both groups, once each
    with pytest.raises(ValueError, match="3 images per process, fewer than batch_size=4"):
        build_loader(RatioDataset(), batch_size=4, shuffle=False, num_workers=0,
                     aspect_ratio_grouping=False, drop_last=True, num_replicas=6, rank=0,
                     distributed=True)
