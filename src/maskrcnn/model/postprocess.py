"""From raw head outputs to detections in the input image's coordinates."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from maskrcnn.model.box_coder import BoxCoder


def detect_boxes(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Per image (boxes (D, 4), scores (D,), labels (D,)): one candidate per proposal and
    foreground class, kept if score > ``score_thresh``, not tiny, and kept by per-class NMS;
    the ``max_detections`` best.

    class_logits: (R, C); box_regression: (R, 4*C); proposals: per image (R_i, 4).
    """
    num_classes = class_logits.shape[-1]
    boxes_all = box_coder.decode(box_regression, torch.cat(proposals))  # (R, C, 4)
    scores_all = F.softmax(class_logits, -1)
    counts = [p.shape[0] for p in proposals]
    out = []
    for boxes, scores, size in zip(
        boxes_all.split(counts), scores_all.split(counts), image_sizes, strict=True
    ):
        boxes = clip_boxes_to_image(boxes, size)
        labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)
        keep = torch.where(scores > score_thresh)[0]
        keep = keep[remove_small_boxes(boxes[keep], min_size=1e-2)]
        keep = keep[batched_nms(boxes[keep], scores[keep], labels[keep], nms_thresh)]
        keep = keep[:max_detections]
        out.append((boxes[keep], scores[keep], labels[keep]))
    return out


def select_mask_probs(mask_logits: Tensor, labels: Tensor) -> Tensor:
    """Sigmoid of the mask channel of each detection's class: (D, C|1, M, M) → (D, 1, M, M)."""
    if mask_logits.shape[1] == 1:
        return mask_logits.sigmoid()
    index = torch.arange(labels.shape[0], device=labels.device)
    return mask_logits[index, labels][:, None].sigmoid()


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow (N, 4) xyxy boxes about their centres by ``scale``."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def interp_matrix(start: Tensor, end: Tensor, length: int, src: int,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Bilinear resampling weights (N, length, src) that stretch a ``src``-pixel row onto
    pixels [start, end] of a ``length``-pixel line (integer bounds, zero elsewhere), with
    ``F.interpolate(mode="bilinear", align_corners=False)``'s sampling positions. Built
    from one-hot comparisons (no in-place scatter), so the ONNX export uses it as is."""
    size = (end - start + 1).clamp(min=1).to(torch.float32)
    pos = torch.arange(length, device=start.device, dtype=torch.float32)
    d = pos[None, :] - start[:, None].to(torch.float32)  # (N, L)
    x = ((src / size)[:, None] * (d + 0.5) - 0.5).clamp(min=0)
    i0 = x.floor().clamp(max=src - 1)
    l1 = x - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=src - 1)
    valid = ((pos[None, :] >= start[:, None]) & (pos[None, :] <= end[:, None])).to(torch.float32)
    cols = torch.arange(src, device=start.device)
    w0 = (i0[..., None] == cols).to(torch.float32) * ((1 - l1) * valid)[..., None]
    w1 = (i1[..., None] == cols).to(torch.float32) * (l1 * valid)[..., None]
    return (w0 + w1).to(dtype)


def paste_masks(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1, chunk: int = 256
) -> Tensor:
    """Paste (N, 1, M, M) mask probabilities into (N, 1, H, W) image-sized masks.

    Same result as torchvision's ``paste_masks_in_image`` (pad the mask by one pixel, grow
    the box to match, round it to integers, bilinear resize into the box) without a Python
    loop over masks: bilinear resizing is separable, so each mask becomes
    ``Wy @ mask @ Wx^T`` with sparse (H, M) and (W, M) weight matrices. Memory beyond the
    output is O(N * (H + W) * M), never N x H x W.
    """
    n = masks.shape[0]
    h, w = image_size
    if n == 0:
        return masks.new_zeros((0, 1, h, w))
    padded = F.pad(masks[:, 0], (padding, padding, padding, padding))
    side = padded.shape[-1]
    scale = float(side) / masks.shape[-1]
    ib = expand_boxes(boxes, scale).to(torch.int64)
    out = masks.new_empty((n, 1, h, w))
    for s in range(0, n, chunk):
        b = ib[s : s + chunk]
        wy = interp_matrix(b[:, 1], b[:, 3], h, side, masks.dtype)
        wx = interp_matrix(b[:, 0], b[:, 2], w, side, masks.dtype)
        torch.bmm(
            torch.bmm(wy, padded[s : s + chunk]), wx.transpose(1, 2), out=out[s : s + chunk, 0]
        )
    return out
