"""The five Mask R-CNN losses, as free functions (torchvision's definitions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

SMOOTH_L1_BETA = 1.0 / 9


def rpn_loss(
    objectness: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, pos: Tensor, neg: Tensor
) -> tuple[Tensor, Tensor]:
    """Objectness BCE and box smooth-L1 over the sampled anchors of the whole batch.

    objectness: (A,) logits; deltas: (A, 4); labels: (A,) in {1, 0, -1};
    targets: (A, 4) encoded boxes; pos / neg: (A,) bool sampled positives / negatives.
    """
    pos_idx = torch.where(pos)[0]
    sampled = torch.cat([pos_idx, torch.where(neg)[0]])
    box_loss = (
        F.smooth_l1_loss(deltas[pos_idx], targets[pos_idx], beta=SMOOTH_L1_BETA, reduction="sum")
        / sampled.numel()
    )
    obj_loss = F.binary_cross_entropy_with_logits(objectness[sampled], labels[sampled])
    return obj_loss, box_loss


def fastrcnn_loss(
    class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Classification cross-entropy and class-specific box smooth-L1.

    class_logits: (R, C); box_regression: (R, 4*C); labels: (R,) int64 in [0, C);
    regression_targets: (R, 4); class_weights: (C,) each RoI's weight in the cross-entropy
    by its label (a weighted mean), None for all 1.
    """
    classification_loss = F.cross_entropy(
        class_logits, labels,
        weight=None if class_weights is None else class_weights.to(class_logits.dtype),
    )
    pos = torch.where(labels > 0)[0]
    box_regression = box_regression.reshape(labels.shape[0], -1, 4)
    box_loss = (
        F.smooth_l1_loss(
            box_regression[pos, labels[pos]],
            regression_targets[pos],
            beta=SMOOTH_L1_BETA,
            reduction="sum",
        )
        / labels.numel()
    )
    return classification_loss, box_loss


def mask_targets(
    gt_masks: list[Tensor], boxes: list[Tensor], matched_idxs: list[Tensor], size: int
) -> Tensor:
    """Ground-truth masks cropped to each positive box and resampled to ``size`` x ``size``.

    One RoIAlign call over all images: the masks of every image are stacked, and each box
    points at its matched mask. Returns (R, size, size) float in [0, 1].
    """
    offsets, offset = [], 0
    for m in gt_masks:
        offsets.append(offset)
        offset += m.shape[0]
    all_boxes = torch.cat(boxes)
    if all_boxes.numel() == 0:
        return all_boxes.new_zeros((0, size, size))
    index = torch.cat([idx + off for idx, off in zip(matched_idxs, offsets, strict=True)])
    shapes = {tuple(m.shape[-2:]) for m in gt_masks if m.shape[0] > 0}
    if len(shapes) == 1:
        stacked = torch.cat([m for m in gt_masks if m.shape[0] > 0])
        rois = torch.cat([index.to(all_boxes)[:, None], all_boxes], dim=1)
        return roi_align(stacked[:, None].to(all_boxes), rois, (size, size), 1.0)[:, 0]
    # Images of different sizes in one batch: crop per image.
    out = [
        roi_align(m[:, None].to(b), torch.cat([i.to(b)[:, None], b], dim=1), (size, size), 1.0)
        for m, b, i in zip(gt_masks, boxes, matched_idxs, strict=True)
        if b.numel() > 0
    ]
    return torch.cat(out)[:, 0]


def maskrcnn_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Per-pixel BCE of each positive RoI's mask for its ground-truth class.

    mask_logits: (R, C or 1, M, M); labels: (R,) int64; targets: (R, M, M).
    """
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    if mask_logits.shape[1] == 1:  # class-agnostic masks
        labels = torch.zeros_like(labels)
    logits = mask_logits[torch.arange(labels.shape[0], device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets)
