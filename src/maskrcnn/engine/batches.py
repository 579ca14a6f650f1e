"""The training sample stream: reproducible per sample, resumable mid-epoch, and tolerant of
bad samples when asked.

Each sample's augmentation draws from a generator seeded by (run seed, epoch, index), so a
run's data do not depend on the number of workers, and a resumed run sees exactly the
samples, in the same order and with the same augmentation, that the interrupted one would
have.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from maskrcnn.data.errors import DatasetError
from maskrcnn.data.loader import collate

Key = tuple[int, int, int]  # (epoch, dataset index, earlier draws of it in the epoch)


@dataclass
class BadSample:
    """A sample that could not be read, kept in the batch so that it can be reported."""

    index: int
    message: str


class SeededDataset(Dataset[Any]):
    """``dataset[(epoch, i, r)]`` is ``dataset[i]`` with torch's RNG seeded per sample (``r``:
    the sample's earlier draws in the epoch). With
    ``skip_bad`` a sample that raises :class:`DatasetError` becomes a :class:`BadSample`."""

    def __init__(self, dataset: Dataset[Any], seed: int, skip_bad: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> Any:
        epoch, index, repeat = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only (the one augmentation draws from, and the one fork_rng
            # restores): torch.manual_seed would reseed the CUDA generators that the model's
            # samplers draw from, and a resumed run would drift from a straight one.
            torch.default_generator.manual_seed(
                (self.seed * 1_000_003 + epoch * 10_007 + index + repeat * 7_919_993) % 2**63
            )
            try:
                return self.dataset[index]
            except DatasetError as err:
                if not self.skip_bad:
                    raise
                return BadSample(index, str(err))


class EpochBatchSampler(Sampler[list[Key]]):
    """Wraps a batch sampler whose order depends on ``set_epoch``; yields ``(epoch, i, r)``
    keys and can start ``skip`` batches into the epoch."""

    def __init__(self, batch_sampler: Sampler[list[int]]) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        inner: Any = getattr(self.batch_sampler, "sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[Key]]:
        # An image drawn twice in an epoch (repeat-factor sampling) is augmented differently
        # each time: the key counts its earlier draws, skipped batches included (resume).
        seen: dict[int, int] = {}
        for k, batch in enumerate(self.batch_sampler):
            keys = []
            for i in batch:
                keys.append((self.epoch, i, seen.get(i, 0)))
                seen[i] = seen.get(i, 0) + 1
            if k >= self.skip:
                yield keys

    def __len__(self) -> int:
        return len(self.batch_sampler) - self.skip  # type: ignore[arg-type]


def collate_checked(
    batch: Sequence[Any],
) -> tuple[list[torch.Tensor], list[dict[str, Any]], list[BadSample]]:
    """``collate`` of the good samples, plus the bad ones set aside."""
    bad = [s for s in batch if isinstance(s, BadSample)]
    good = [s for s in batch if not isinstance(s, BadSample)]
    images, targets = collate(good) if good else ([], [])
    return images, targets, bad


def training_loader(loader: DataLoader[Any], seed: int, skip_bad: bool) -> DataLoader[Any]:
    """A loader over the same dataset and batches as ``loader`` (from ``build_loader``), made
    reproducible per sample and resumable (see :class:`EpochBatchSampler`)."""
    assert loader.batch_sampler is not None
    return DataLoader(
        SeededDataset(loader.dataset, seed, skip_bad),
        batch_sampler=EpochBatchSampler(loader.batch_sampler),  # type: ignore[arg-type]
        num_workers=loader.num_workers,
        collate_fn=collate_checked,
        persistent_workers=loader.num_workers > 0,
        # Its own generator: starting an epoch must not draw from the global RNG, which the
        # model's samplers use (a resumed run would otherwise drift from a straight one).
        generator=torch.Generator().manual_seed(seed),
    )
