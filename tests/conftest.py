"""Fixtures shared across test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from maskrcnn.engine.trainer import Trainer
from tiny_run import tiny_config


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for 40 iterations on synthetic shapes (its run folder): good
    enough to give confident detections, in about ten seconds."""
    out = tmp_path_factory.mktemp("trained_tiny")
    Trainer(
        tiny_config(out, "solver.max_iter=40", "solver.base_lr=0.02", "run.num_overlays=0"),
        show_progress=False,
    ).train()
    return out


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny convolutions run faster that way on two shared
    cores, and child processes started with OMP_NUM_THREADS=1 sum in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-iteration training run: ``last.pth`` and its synthetic dataset under ``data``."""
    out = tmp_path_factory.mktemp("run")
    overrides = ("solver.max_iter=2", "model.fpn_channels=32", "run.num_overlays=0")
    Trainer(tiny_config(out, *overrides), show_progress=False).train()
    return out
