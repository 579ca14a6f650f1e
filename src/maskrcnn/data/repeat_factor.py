"""Repeat-factor sampling for class imbalance (LVIS, Gupta et al. 2019; detectron2's
``RepeatFactorTrainingSampler``).

A class present in a fraction ``f_c`` of the images gets the factor
``r_c = max(1, sqrt(t / f_c))`` for the threshold ``t``; an image repeats ``r_i`` times, the
largest factor of its classes (1 for an image without objects). Each epoch an image appears
``floor(r_i)`` times and once more with probability ``r_i - floor(r_i)``, then the list is
shuffled. Both draws come from ``seed + epoch`` alone, so an epoch is the same whether a run
went straight through or was resumed, and every process computes the same list and takes its
share of it, as ``DistributedSampler`` does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def repeat_factors(image_labels: Sequence[set[int]], threshold: float) -> list[float]:
    """Each image's repeat factor, from the labels of its objects (see the module)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"repeat_factor_threshold must be in (0, 1], got {threshold}")
    images = max(len(image_labels), 1)
    frequency = Counter(label for labels in image_labels for label in labels)
    factor = {c: max(1.0, math.sqrt(threshold / (n / images))) for c, n in frequency.items()}
    return [max((factor[c] for c in labels), default=1.0) for labels in image_labels]


class RepeatFactorSampler(Sampler[int]):
    """Indices of an epoch with each image repeated by its factor (see the module); call
    ``set_epoch`` before each epoch. With ``num_replicas`` processes, the epoch's list is
    padded by wrapping around to a multiple of ``num_replicas`` and process ``rank`` takes
    every ``num_replicas``-th index from ``rank`` on."""

    def __init__(
        self, factors: Sequence[float], seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.factors = torch.tensor(factors, dtype=torch.float64)
        self.seed, self.num_replicas, self.rank = seed, num_replicas, rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> list[int]:
        """Every process's indices of this epoch, in order, before the split."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        whole = self.factors.floor()
        extra = torch.rand(len(self.factors), generator=generator, dtype=torch.float64)
        counts = (whole + (extra < self.factors - whole)).long()
        indices = torch.repeat_interleave(torch.arange(len(self.factors)), counts)
        return indices[torch.randperm(len(indices), generator=generator)].tolist()

    def _share(self) -> list[int]:
        indices = self.epoch_indices()
        total = math.ceil(len(indices) / self.num_replicas) * self.num_replicas
        padded = (indices * math.ceil(total / max(len(indices), 1)))[:total]
        return padded[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._share())

    def __len__(self) -> int:
        return len(self._share())
