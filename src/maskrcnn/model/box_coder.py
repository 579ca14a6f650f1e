"""Encoding of boxes as regression targets relative to reference boxes, and back."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Faster R-CNN box parametrisation (dx, dy, dw, dh), scaled by ``weights``.

    Boxes are (N, 4) xyxy in absolute pixels.
    """

    def __init__(
        self, weights: tuple[float, float, float, float], scale_clamp: float = DEFAULT_SCALE_CLAMP
    ) -> None:
        self.weights = weights
        self.scale_clamp = scale_clamp

    def encode(self, gt_boxes: Tensor, reference: Tensor) -> Tensor:
        """Regression targets (N, 4) that turn ``reference`` (N, 4) into ``gt_boxes`` (N, 4)."""
        wx, wy, ww, wh = self.weights
        ex_w = reference[:, 2] - reference[:, 0]
        ex_h = reference[:, 3] - reference[:, 1]
        ex_x = reference[:, 0] + 0.5 * ex_w
        ex_y = reference[:, 1] + 0.5 * ex_h
        gt_w = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_h = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_x = gt_boxes[:, 0] + 0.5 * gt_w
        gt_y = gt_boxes[:, 1] + 0.5 * gt_h
        dx = wx * (gt_x - ex_x) / ex_w
        dy = wy * (gt_y - ex_y) / ex_h
        dw = ww * torch.log(gt_w / ex_w)
        dh = wh * torch.log(gt_h / ex_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """Apply ``deltas`` (N, 4*K) to ``reference`` (N, 4); returns boxes (N, K, 4)."""
        reference = reference.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = reference[:, 2:3] - reference[:, 0:1]
        heights = reference[:, 3:4] - reference[:, 1:2]
        ctr_x = reference[:, 0:1] + 0.5 * widths
        ctr_y = reference[:, 1:2] + 0.5 * heights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)
        pred_x = dx * widths + ctr_x
        pred_y = dy * heights + ctr_y
        half_w = 0.5 * (torch.exp(dw) * widths)
        half_h = 0.5 * (torch.exp(dh) * heights)
        return torch.stack((pred_x - half_w, pred_y - half_h, pred_x + half_w, pred_y + half_h), 2)
