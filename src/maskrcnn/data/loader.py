"""Batching ``(image, target)`` samples for torchvision-style detection models.

``collate`` keeps images at their own sizes: a batch is ``(list of (3, H, W) tensors, list of
target dicts)``, exactly what ``model(images, targets)`` takes. ``build_loader`` adds
aspect-ratio grouping, an optional ``DistributedSampler`` and seeding for reproducible runs.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    SequentialSampler,
    Subset,
)

from maskrcnn.data.repeat_factor import RepeatFactorSampler

Target = dict[str, Any]
LANDSCAPE, PORTRAIT = 0, 1
_DTYPES = {"boxes": torch.float32, "labels": torch.int64, "masks": torch.uint8}


def _plain(value: Any) -> Any:
    # tv_tensors (Image, BoundingBoxes, Mask) become plain tensors: models index and stack them.
    return value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value


def collate_target(target: Mapping[str, Any]) -> Target:
    """One target as plain tensors: boxes float32 (N, 4), labels int64 (N,), masks uint8
    (N, H, W), image_id int; other keys are kept (tensors unwrapped)."""
    out = {key: _plain(value) for key, value in target.items()}
    for key, dtype in _DTYPES.items():
        if key in out:
            out[key] = out[key].to(dtype)
    if "image_id" in out:
        out["image_id"] = int(out["image_id"])
    return out


def collate(
    batch: Sequence[tuple[torch.Tensor, Mapping[str, Any]]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """A list of samples → (images as plain tensors of their own sizes, targets)."""
    images = [_plain(image) for image, _ in batch]
    targets = [collate_target(target) for _, target in batch]
    return images, targets


def orientation_groups(aspect_ratios: Sequence[float]) -> list[int]:
    """Width / height → group id: ``LANDSCAPE`` (>= 1, square too) or ``PORTRAIT``."""
    return [LANDSCAPE if ratio >= 1.0 else PORTRAIT for ratio in aspect_ratios]


def dataset_aspect_ratios(
    dataset: Dataset[Any], aspect_ratio_fn: Callable[[int], float] | None = None
) -> list[float]:
    """Width / height per dataset index.

    From ``aspect_ratio_fn(index)`` when given, else ``dataset.aspect_ratios()`` (looked up
    through ``Subset``), else by loading every sample (slow: it decodes every image).
    """
    size = len(dataset)  # type: ignore[arg-type]
    if aspect_ratio_fn is not None:
        return [float(aspect_ratio_fn(i)) for i in range(size)]
    if hasattr(dataset, "aspect_ratios"):
        return [float(r) for r in dataset.aspect_ratios()]
    if isinstance(dataset, Subset):
        parent = dataset_aspect_ratios(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    ratios = []
    for i in range(size):
        height, width = dataset[i][0].shape[-2:]
        ratios.append(width / height)
    return ratios


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches indices from ``sampler`` so that each batch holds a single group.

    Like torchvision's reference sampler, the number of batches is fixed by the sampler's
    length (``ceil(n / batch_size)``, or ``floor`` with ``drop_last``), so every rank of a
    distributed run yields the same count. The end-of-epoch leftovers of a group are topped
    up with earlier indices of the same group, so a few samples repeat within an epoch.
    """

    def __init__(
        self, sampler: Sampler[int], group_ids: Sequence[int], batch_size: int, drop_last: bool
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last

    def __iter__(self) -> Iterator[list[int]]:
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for index in self.sampler:
            group = self.group_ids[index]
            buffers[group].append(index)
            seen[group].append(index)
            if len(buffers[group]) == self.batch_size:
                yield buffers.pop(group)
                emitted += 1
        leftovers = sorted((b for b in buffers.values() if b), key=len, reverse=True)
        if not self.drop_last:
            # Every index exactly once, as BatchSampler gives them: the leftovers of all
            # groups in turn (only these last batches may mix orientations).
            rest = [i for buffer in leftovers for i in buffer]
            for start in range(0, len(rest), self.batch_size):
                yield rest[start:start + self.batch_size]
            return
        # Leftovers hold < batch_size each, so there are always enough of them to reach len().
        for buffer, _ in zip(leftovers, range(len(self) - emitted), strict=False):
            yield self._top_up(buffer, seen[self.group_ids[buffer[0]]])

    def _top_up(self, buffer: list[int], seen: list[int]) -> list[int]:
        pool = [i for i in seen if i not in buffer] or buffer
        extra = itertools.islice(itertools.cycle(pool), self.batch_size - len(buffer))
        return buffer + list(extra)

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seeds numpy and ``random`` from the worker's torch seed.

    The DataLoader already seeds each worker's torch RNG with ``base_seed + worker_id``, where
    ``base_seed`` comes from the loader's seeded generator.
    """
    del worker_id
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_sampler(
    dataset: Dataset[Any],
    shuffle: bool,
    distributed: bool,
    seed: int,
    num_replicas: int | None = None,
    rank: int | None = None,
    factors: Sequence[float] | None = None,
) -> Sampler[int]:
    """Index sampler. Shuffling uses ``DistributedSampler`` (one replica when not distributed)
    so the order is a pure function of ``seed`` and the epoch given to ``set_epoch``; with
    repeat ``factors`` (one per image), a :class:`RepeatFactorSampler`, as reproducible."""
    if factors is not None:
        if distributed and (num_replicas is None or rank is None):
            num_replicas, rank = dist.get_world_size(), dist.get_rank()
        return RepeatFactorSampler(factors, seed, num_replicas or 1, rank or 0)
    if distributed:
        return DistributedSampler(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
        )
    if shuffle:
        return DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    return SequentialSampler(dataset)  # type: ignore[arg-type]


def build_loader(
    dataset: Dataset[Any],
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    aspect_ratio_grouping: bool = True,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    *,
    num_replicas: int | None = None,
    rank: int | None = None,
    aspect_ratio_fn: Callable[[int], float] | None = None,
    pin_memory: bool = False,
    repeat_factors: Sequence[float] | None = None,
) -> DataLoader[Any]:
    """A DataLoader yielding ``collate`` batches.

    Call ``set_epoch(loader, epoch)`` at the start of every epoch: without it each epoch sees
    the same order. ``num_replicas``/``rank`` default to the initialised process group.
    Worker RNGs derive from ``seed`` (and the rank); with ``num_workers=0`` random transforms
    use the main process's RNG, which ``torch.manual_seed`` controls. ``repeat_factors``:
    repeat-factor sampling (``data.repeat_factor``), one factor per image.
    """
    sampler = build_sampler(dataset, shuffle, distributed, seed, num_replicas, rank,
                            repeat_factors)
    batch_sampler: Sampler[list[int]]
    if aspect_ratio_grouping:
        groups = orientation_groups(dataset_aspect_ratios(dataset, aspect_ratio_fn))
        batch_sampler = GroupedBatchSampler(sampler, groups, batch_size, drop_last)
    else:
        batch_sampler = BatchSampler(sampler, batch_size, drop_last)
    if drop_last and len(batch_sampler) == 0:  # training would wait for a batch forever
        images = len(sampler)  # type: ignore[arg-type]
        raise ValueError(
            f"{images} images per process, fewer than batch_size={batch_size}: no full batch "
            "to train on (lower data.batch_size or add images)"
        )
    generator = torch.Generator()
    generator.manual_seed(seed + getattr(sampler, "rank", 0))
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=seed_worker,
        generator=generator,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )


def set_epoch(loader: DataLoader[Any], epoch: int) -> None:
    """Forwards ``epoch`` to the loader's sampler (new order per epoch)."""
    sampler: Any = getattr(loader.batch_sampler, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler, RepeatFactorSampler
        sampler.set_epoch(epoch)
