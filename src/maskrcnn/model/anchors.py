"""Anchor boxes for every position of every feature-pyramid level."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def cell_anchors(size: int, aspect_ratios: tuple[float, ...]) -> Tensor:
    """Zero-centred anchors (A, 4) xyxy of one ``size`` and each aspect ratio (h / w),
    rounded to integers as in Detectron and torchvision."""
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = w_ratios * size
    hs = h_ratios * size
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """One anchor size per pyramid level, several aspect ratios per size.

    Anchors of level ``l`` are the cell anchors shifted to every feature-map position
    ``(x * stride, y * stride)``, where stride = padded image size // feature-map size.
    """

    def __init__(self, sizes: tuple[int, ...], aspect_ratios: tuple[float, ...]) -> None:
        super().__init__()
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.cell = [cell_anchors(s, aspect_ratios) for s in sizes]
        self._cache: dict[tuple[object, ...], list[Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def forward(
        self,
        image_size: tuple[int, int],
        feature_sizes: list[tuple[int, int]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> list[Tensor]:
        """Anchors per level, each (H_l * W_l * A, 4), for a padded batch of ``image_size``."""
        key = (image_size, tuple(feature_sizes), dtype, device)
        if key not in self._cache:
            if len(self._cache) > 32:  # many distinct sizes in a run: keep memory bounded
                self._cache.clear()
            self._cache[key] = [
                self._grid(base.to(device=device, dtype=dtype), image_size, fsize)
                for base, fsize in zip(self.cell, feature_sizes, strict=True)
            ]
        return self._cache[key]

    @staticmethod
    def _grid(base: Tensor, image_size: tuple[int, int], feature_size: tuple[int, int]) -> Tensor:
        fh, fw = feature_size
        stride_h, stride_w = image_size[0] // fh, image_size[1] // fw
        shifts_x = torch.arange(0, fw, dtype=torch.int32, device=base.device) * stride_w
        shifts_y = torch.arange(0, fh, dtype=torch.int32, device=base.device) * stride_h
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1).to(base.dtype)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)
