"""Mask branch: four 3x3 convs, a 2x transposed conv and per-class mask logits."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation


class MaskHead(nn.Sequential):
    """(R, C, 14, 14) RoI features → (R, 256, 14, 14); keys ``0.0.weight``… as torchvision.
    ``norm_layer``: None (v1) or BatchNorm2d after each conv (v2)."""

    def __init__(
        self,
        in_channels: int,
        layers: tuple[int, ...] = (256, 256, 256, 256),
        norm_layer: Callable[..., nn.Module] | None = None,
    ) -> None:
        blocks, prev = [], in_channels
        for width in layers:
            blocks.append(Conv2dNormActivation(prev, width, kernel_size=3, norm_layer=norm_layer))
            prev = width
        super().__init__(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class MaskPredictor(nn.Sequential):
    """(R, C, 14, 14) → (R, num_masks, 28, 28) logits; num_masks is 1 for class-agnostic
    masks, else the number of classes."""

    conv5_mask: nn.ConvTranspose2d
    relu: nn.ReLU
    mask_fcn_logits: nn.Conv2d

    def __init__(self, in_channels: int, dim: int, num_masks: int) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv5_mask", nn.ConvTranspose2d(in_channels, dim, 2, 2, 0)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("mask_fcn_logits", nn.Conv2d(dim, num_masks, 1, 1, 0)),
                ]
            )
        )
        for name, param in self.named_parameters():
            if "weight" in name:
                nn.init.kaiming_normal_(param, mode="fan_out", nonlinearity="relu")
            elif "bias" in name:
                nn.init.constant_(param, 0)

    def logits_of(self, x: Tensor, labels: Tensor) -> Tensor:
        """``forward(x)[i, labels[i]]`` as (R, 1, M, M): the mask logits of one class per
        RoI, without the 1x1 convolution of all the other classes — a dot product of each
        pixel's features with that class's weights."""
        conv = self.mask_fcn_logits
        h = self.relu(self.conv5_mask(x))
        if conv.out_channels == 1:
            return conv(h)
        n, c, m, _ = h.shape
        weight = conv.weight[labels, :, 0, 0]  # (R, C)
        if h.is_contiguous(memory_format=torch.channels_last):  # pixels (R, M*M, C)
            out = torch.bmm(h.permute(0, 2, 3, 1).reshape(n, m * m, c), weight[:, :, None])
        else:  # channels (R, C, M*M)
            out = torch.bmm(weight[:, None, :], h.reshape(n, c, m * m))
        out = out.view(n, 1, m, m)
        return out if conv.bias is None else out + conv.bias[labels].view(n, 1, 1, 1)
