"""The normalisation of the trainable backbone stages, chosen by ``ModelConfig.norm``.

Backbones are built with FrozenBatchNorm2d (torchvision's detection default) and their
ImageNet weights loaded into it; :func:`convert_norms` then swaps the norms of the stages
that train for the chosen kind, carrying the loaded statistics and affine parameters over:

- ``frozen``: kept as they are (a fixed per-channel affine map).
- ``bn`` / ``syncbn``: ``nn.BatchNorm2d`` starting from the ImageNet running statistics,
  normalising by batch statistics in training and updating the running ones. Its state dict
  has the same keys as the frozen norm's plus ``num_batches_tracked``, which torchvision's
  FrozenBatchNorm2d drops on load and BatchNorm2d fills in when missing, so state dicts move
  between the two both ways. ``syncbn`` becomes ``nn.SyncBatchNorm`` when training with
  several CUDA processes (see :func:`sync_batchnorm`).
- ``gn``: ``nn.GroupNorm`` (32 groups, fewer where the channels do not divide by 32) taking
  the norm's scale and shift; its statistics come from each image alone, whatever the batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

GROUPS = 32


def batchnorm_from(frozen: FrozenBatchNorm2d) -> nn.BatchNorm2d:
    """A trainable BatchNorm2d computing what ``frozen`` computes in eval mode."""
    bn = nn.BatchNorm2d(frozen.weight.numel(), eps=frozen.eps)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.weight.copy_(frozen.weight)
        bn.bias.copy_(frozen.bias)
        bn.running_mean.copy_(frozen.running_mean)
        bn.running_var.copy_(frozen.running_var)
    return bn


def group_norm(channels: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm over ``channels`` in 32 groups, or the largest count dividing both."""
    return nn.GroupNorm(math.gcd(GROUPS, channels), channels, eps=eps)


def groupnorm_from(frozen: FrozenBatchNorm2d) -> nn.GroupNorm:
    """A GroupNorm over the same channels with ``frozen``'s scale and shift."""
    gn = group_norm(frozen.weight.numel(), eps=frozen.eps)
    with torch.no_grad():
        gn.weight.copy_(frozen.weight)
        gn.bias.copy_(frozen.bias)
    return gn


def convert_norms(module: nn.Module, kind: str, inside: Iterable[nn.Module] | None = None) -> int:
    """Replace every FrozenBatchNorm2d of ``module`` (only those also inside one of the
    modules ``inside`` when given) by the norm ``kind`` names (see the module docstring);
    parameters of the new norms train. Returns how many were replaced."""
    if kind == "frozen":
        return 0
    make = groupnorm_from if kind == "gn" else batchnorm_from
    chosen = None if inside is None else {id(m) for part in inside for m in part.modules()}
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d) and (chosen is None or id(child) in chosen):
                setattr(parent, name, make(child))
                replaced += 1
    return replaced


def sync_batchnorm(module: nn.Module, device: torch.device, world_size: int) -> None:
    """Synchronise, in place, the BatchNorm2d layers inside ``module`` (not ``module``
    itself) across ``world_size`` processes (``norm=syncbn``). PyTorch synchronises batch
    statistics on CUDA only: several CPU processes are refused rather than silently
    normalised per process."""
    if world_size <= 1:
        return
    if device.type != "cuda":
        raise ValueError(
            "model.norm=syncbn synchronises BatchNorm across processes on CUDA only; on the "
            f"CPU with {world_size} processes use model.norm=bn (statistics per process) or gn"
        )
    nn.SyncBatchNorm.convert_sync_batchnorm(module)
