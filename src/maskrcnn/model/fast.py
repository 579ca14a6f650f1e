"""The fast inference path: frozen BatchNorm folded into convolutions, channels-last memory
layout, and reduced-precision autocast where the hardware has it."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.model.frozen_bn import ConvFrozenBN, affine_of, conv_norm_pairs
from maskrcnn.utils.precision import cpu_supports_bf16


def fold_batchnorm(module: nn.Module) -> int:
    """Fold every FrozenBatchNorm2d or BatchNorm2d (by its running statistics, as in eval
    mode) that directly follows a Conv2d among a module's children (the layout of
    torchvision's ResNets and MobileNetV2) into that convolution, replacing the norm by
    Identity. Returns how many were folded. The result equals the eval-mode original up to
    float rounding: conv(x) * s + t == conv'(x) with W' = W * s, b' = b * s + t. GroupNorm
    depends on each input's statistics and stays as it is."""
    folded = 0
    for parent, conv, bn_name, bn in conv_norm_pairs(module):
        _fold(conv, bn)
        setattr(parent, bn_name, nn.Identity())
        folded += 1
    return folded


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: FrozenBatchNorm2d | nn.BatchNorm2d) -> None:
    scale, shift = affine_of(bn)
    if isinstance(conv, ConvFrozenBN):
        conv.attach(None)  # the norm is now inside the weights for good
    conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
    if conv.bias is None:
        conv.bias = nn.Parameter(shift.clone(), requires_grad=False)
    else:
        conv.bias.mul_(scale).add_(shift)


def default_fast_precision(device: torch.device) -> str:
    """fp16 on CUDA, bf16 on a CPU with native bf16, else fp32."""
    if device.type == "cuda":
        return "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def cast_autocast_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of every convolution and linear layer in ``dtype``, the precision
    autocast would cast them to on every call anyway: same outputs, without re-casting
    some 40 M parameters per image. Returns how many layers were cast."""
    cast = 0
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            layer.to(dtype)
            cast += 1
    return cast
