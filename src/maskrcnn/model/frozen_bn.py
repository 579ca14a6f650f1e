"""Training with frozen BatchNorm at the cost of the convolution alone.

A frozen BatchNorm after a convolution is a fixed per-channel affine map, so
``bn(conv(x, W) + b) == conv(x, W * s) + (b * s + t)``. In training the pair runs as that
one convolution, with the scaled weights recomputed from ``W`` at every call (a few
thousand multiplications), so gradients still reach ``W`` and the result is the same up to
float rounding. This saves two full passes over every activation in the forward pass and
two in the backward pass, and under bf16 autocast it also keeps activations in bf16 (the
norm's float32 buffers would otherwise promote them to float32 between every layer).

Module names, parameters and buffers stay where they were, so state dicts are unchanged,
and in eval mode both modules compute exactly what they did before.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import TypeVar

from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d


def affine_of(bn: FrozenBatchNorm2d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, shift) with ``bn(x) == x * scale + shift`` per channel (a BatchNorm2d in eval
    mode, i.e. normalising by its running statistics)."""
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    return scale, bn.bias - bn.running_mean * scale


class ConvFrozenBN(nn.Conv2d):
    """A convolution that, in training, applies the frozen norm that follows it."""

    def attach(self, bn: FrozenBatchNorm2d | None) -> None:
        # Not submodules of each other: the norm stays registered where it was.
        self.__dict__["norm"] = bn
        if bn is not None:
            bn.__dict__["conv"] = self

    def applies_norm(self) -> bool:
        """Whether this call applies the norm: both modules in training mode (a norm put in
        eval mode on its own, a common idiom, then applies itself, and only once)."""
        bn = self.__dict__.get("norm")
        return bn is not None and self.training and bn.training

    def forward(self, x: Tensor) -> Tensor:
        if not self.applies_norm():
            return super().forward(x)
        scale, shift = affine_of(self.__dict__["norm"])
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        return self._conv_forward(x, weight, bias)


class FusedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen norm whose convolution applies it in training: then it passes through."""

    def forward(self, x: Tensor) -> Tensor:
        conv = self.__dict__.get("conv")
        return x if conv is not None and conv.applies_norm() else super().forward(x)


def conv_norm_pairs(
    module: nn.Module,
) -> Iterator[tuple[nn.Module, nn.Conv2d, str, FrozenBatchNorm2d | nn.BatchNorm2d]]:
    """``(parent, conv, norm name, norm)`` for every Conv2d directly followed by a
    FrozenBatchNorm2d or BatchNorm2d among the children of ``module`` or of any module inside
    it (the layouts of torchvision's ResNets and MobileNetV2). The caller may replace the
    norm."""
    for parent in list(module.modules()):
        for (_, conv), (bn_name, bn) in itertools.pairwise(list(parent.named_children())):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (FrozenBatchNorm2d, nn.BatchNorm2d)):
                yield parent, conv, bn_name, bn


def fuse_for_training(module: nn.Module) -> int:
    """Swap every (Conv2d, FrozenBatchNorm2d) pair of ``conv_norm_pairs`` not fused yet for
    the training-time fused pair, keeping their parameters and buffers. Returns how many
    pairs were fused. Not to be confused with ``model.fast.fold_batchnorm`` (inference): that
    one folds a norm into its convolution's weights for good; this one keeps ``W`` and the
    norm's buffers as they are (training and state dicts unchanged) and only runs the pair
    as one convolution."""
    fused = 0
    for _, conv, _, bn in conv_norm_pairs(module):
        if type(conv) is nn.Conv2d and type(bn) is FrozenBatchNorm2d:
            _swap_class(conv, ConvFrozenBN).attach(_swap_class(bn, FusedFrozenBatchNorm2d))
            fused += 1
    return fused


M = TypeVar("M", bound=nn.Module)


def _swap_class(module: nn.Module, cls: type[M]) -> M:
    """The same module object (parameters, buffers, hooks) as an instance of ``cls``, a
    subclass of its class that adds behaviour only."""
    assert issubclass(cls, type(module))
    module.__class__ = cls
    return module  # type: ignore[return-value]
