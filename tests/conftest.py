"""Fixtures shared across test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

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
