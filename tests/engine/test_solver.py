"""Learning-rate schedules and parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from maskrcnn.config import SolverConfig
from maskrcnn.engine.solver import build_optimizer, build_scheduler, effective_lr, lr_factor


def test_warmup_then_steps() -> None:
    cfg = SolverConfig(warmup_iters=10, warmup_factor=0.1, steps=(20, 30), gamma=0.1)
    assert lr_factor(cfg, 0) == pytest.approx(0.1)
    assert lr_factor(cfg, 5) == pytest.approx(0.1 * 0.5 + 0.5)  # halfway up the ramp
    assert lr_factor(cfg, 10) == 1.0
    assert lr_factor(cfg, 19) == 1.0
    assert lr_factor(cfg, 20) == pytest.approx(0.1)
    assert lr_factor(cfg, 30) == pytest.approx(0.01)


def test_cosine() -> None:
    cfg = SolverConfig(schedule="cosine", warmup_iters=0, max_iter=100)
    assert lr_factor(cfg, 0) == 1.0
    assert lr_factor(cfg, 50) == pytest.approx(0.5)
    assert lr_factor(cfg, 25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(cfg, 100) == pytest.approx(0.0)


def test_scheduler_drives_the_optimizer() -> None:
    model = nn.Linear(2, 2)
    cfg = SolverConfig(base_lr=0.5, warmup_iters=0, steps=(2,), gamma=0.1)
    opt = build_optimizer(model, cfg, cfg.base_lr)
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 0.5, 0.05])


def test_no_decay_on_norm_and_bias() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    model.append(frozen)
    opt = build_optimizer(model, SolverConfig(no_decay_norm_and_bias=True), 0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3])]
    assert len(no_decay["params"]) == 3  # conv bias, bn weight, bn bias; frozen left out
    plain = build_optimizer(model, SolverConfig(), 0.1)
    assert len(plain.param_groups) == 1 and len(plain.param_groups[0]["params"]) == 4


def test_linear_scaling_rule() -> None:
    cfg = SolverConfig(base_lr=0.02, scale_lr=True, reference_batch_size=16, accumulation_steps=2)
    assert effective_lr(cfg, batch_size=4) == pytest.approx(0.02 * 8 / 16)
    assert effective_lr(cfg, batch_size=4, world_size=2) == pytest.approx(0.02)
    assert effective_lr(SolverConfig(base_lr=0.02), batch_size=4) == 0.02


def test_steps_after_the_last_iteration_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    cfg = SolverConfig(max_iter=5000)  # the default steps (60000, 80000) never come
    with caplog.at_level("WARNING", logger="maskrcnn"):
        build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), cfg)
    assert "solver.steps [60000, 80000] are not before solver.max_iter=5000" in caplog.text
