"""Optimiser and learning-rate schedule."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from maskrcnn.config import SolverConfig

log = logging.getLogger("maskrcnn")
NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.SyncBatchNorm)


def effective_lr(cfg: SolverConfig, batch_size: int, world_size: int = 1) -> float:
    """``base_lr``, or with ``scale_lr`` the linear scaling rule: base_lr × effective batch /
    reference batch (effective batch = batch × accumulation steps × processes)."""
    if not cfg.scale_lr:
        return cfg.base_lr
    effective = batch_size * cfg.accumulation_steps * world_size
    return cfg.base_lr * effective / cfg.reference_batch_size


def build_optimizer(model: nn.Module, cfg: SolverConfig, lr: float) -> torch.optim.SGD:
    """SGD with momentum; with ``no_decay_norm_and_bias`` biases and normalisation weights
    get no weight decay (frozen parameters are left out altogether)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            plain = name == "bias" or isinstance(module, NORM_TYPES)
            (no_decay if cfg.no_decay_norm_and_bias and plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)


def lr_factor(cfg: SolverConfig, step: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based): linear
    warm-up from ``warmup_factor``, then step decay at ``steps`` or a cosine to zero."""
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * min(step, cfg.max_iter) / cfg.max_iter))
    else:
        factor = cfg.gamma ** sum(1 for s in cfg.steps if step >= s)
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SolverConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimiser step (not per micro-batch)."""
    late = [s for s in cfg.steps if s >= cfg.max_iter]
    if cfg.schedule == "multistep" and late:
        log.warning(
            "solver.steps %s are not before solver.max_iter=%d: the learning rate will not "
            "decay there (set solver.steps for this run's length)", late, cfg.max_iter,
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(cfg, step))
