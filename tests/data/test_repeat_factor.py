"""Repeat-factor sampling: the LVIS factors by hand, their expectation over epochs, the same
epoch every time it is drawn, and the split between processes."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from maskrcnn.data.repeat_factor import RepeatFactorSampler, repeat_factors


def test_factors_follow_the_lvis_rule() -> None:
    # class 1 in 3 of 4 images (f = 0.75), class 2 in 1 of 4 (f = 0.25); t = 0.5
    labels = [{1}, {1}, {1, 2}, set()]
    factors = repeat_factors(labels, 0.5)
    assert factors == pytest.approx([1.0, 1.0, math.sqrt(0.5 / 0.25), 1.0])
    with pytest.raises(ValueError, match="threshold must be in"):
        repeat_factors(labels, 0.0)


def test_each_image_appears_its_factor_times_on_average() -> None:
    factors = [1.0, 2.5, 1.2, 3.0]
    sampler = RepeatFactorSampler(factors, seed=3)
    counts: Counter[int] = Counter()
    epochs = 2000
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts.update(sampler)
    for index, factor in enumerate(factors):
        assert counts[index] / epochs == pytest.approx(factor, abs=0.05)


def test_an_epoch_is_the_same_whenever_it_is_drawn() -> None:
    a, b = RepeatFactorSampler([1.5] * 20, seed=7), RepeatFactorSampler([1.5] * 20, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and len(a) == len(list(a))
    b.set_epoch(5)
    assert list(a) != list(b)


def test_processes_share_one_epoch_list() -> None:
    factors = [1.0, 1.7, 2.2, 1.0, 1.0]
    shares = [RepeatFactorSampler(factors, seed=1, num_replicas=3, rank=r) for r in range(3)]
    for s in shares:
        s.set_epoch(2)
    whole = shares[0].epoch_indices()
    lists = [list(s) for s in shares]
    assert len({len(x) for x in lists}) == 1  # every process the same number of batches
    merged = [lists[k % 3][k // 3] for k in range(3 * len(lists[0]))]
    padding = len(merged) - len(whole)
    assert merged[: len(whole)] == whole and merged[len(whole) :] == whole[:padding]
