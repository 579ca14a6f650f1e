"""Retaining freed memory: a block freed and allocated again comes back without page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate, write and free a 64 MiB tensor six times; print the page faults of the last
# round. Retained, the heap settles on reusing two blocks within the first three rounds;
# with glibc's defaults the block is a fresh map each time (16,384 pages to fault).
# torchvision is imported first, as every maskrcnn process does before its first image
# (without it, in a bare torch process, glibc serves this block from a fresh map each time).
PROBE = """
import resource, sys, torch, torchvision
from maskrcnn.utils import malloc
applied = malloc.retain_freed_memory()
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 << 20, dtype=torch.float32)
    x.fill_(1.0)
    del x
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, malloc.setting(), faults)
"""


def _probe(setting: str) -> tuple[str, str, int]:
    env = {**os.environ, "MASKRCNN_MALLOC": setting, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], out[1], int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    applied, setting, faults = _probe("")
    assert (applied, setting) == ("True", "retained")
    assert faults < 1000  # the heap hands back pages it already mapped


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_opting_out_keeps_the_system_allocator() -> None:
    applied, setting, faults = _probe("system")
    assert (applied, setting) == ("False", "system")
    assert faults >= 16000  # 64 MiB of fresh pages, every time
