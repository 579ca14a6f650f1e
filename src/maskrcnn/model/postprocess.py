"""From raw head outputs to detections in the input image's coordinates."""

from __future__ import annotations

import math
import mmap

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image, remove_small_boxes

from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.structures.detections import Detections


def detect_boxes(
    class_logits: Tensor,
    box_regression: Tensor,
    proposals: list[Tensor],
    image_sizes: list[tuple[int, int]],
    box_coder: BoxCoder,
    score_thresh: float,
    nms_thresh: float,
    max_detections: int,
) -> list[Detections]:
    """Per image the detections: one candidate per proposal and
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
        keep = keep[
            best_after_nms(boxes[keep], scores[keep], labels[keep], nms_thresh, max_detections)
        ]
        out.append(Detections(boxes[keep], scores[keep], labels[keep]))
    return out


def best_after_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, k: int
) -> Tensor:
    """``batched_nms(boxes, scores, groups, iou_threshold)[:k]`` without suppressing among
    all candidates: greedy NMS decides each box from the higher-scored ones alone, so NMS
    over the ``m`` best candidates decides exactly for those ``m``. Once it keeps ``k`` of
    them, the rest cannot make the top ``k``; otherwise ``m`` doubles. With a low score
    threshold (thousands of candidates over many classes) this is most of the saving."""
    order = scores.argsort(descending=True, stable=True)
    m = min(order.numel(), max(8 * k, 512))
    while True:
        best = order[:m]
        kept = batched_nms(boxes[best], scores[best], groups[best], iou_threshold)
        if kept.numel() >= k or m == order.numel():
            return best[kept[:k]]
        m = min(order.numel(), 2 * m)


def expand_boxes(boxes: Tensor, scale: float) -> Tensor:
    """Grow (N, 4) xyxy boxes about their centres by ``scale``."""
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    return torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)


def interp_matrix(
    start: Tensor,
    end: Tensor,
    length: int,
    src: int,
    dtype: torch.dtype = torch.float32,
    offset: Tensor | None = None,
) -> Tensor:
    """Bilinear resampling weights (N, length, src) that stretch a ``src``-pixel row onto
    pixels [start, end] of a line (integer bounds, zero elsewhere), with
    ``F.interpolate(mode="bilinear", align_corners=False)``'s sampling positions. Row ``i``
    holds the weights of pixel ``offset + i`` (``offset`` (N,), zero by default: the whole
    line). Built from one-hot comparisons (no in-place scatter), so the ONNX export uses it
    as is."""
    size = (end - start + 1).clamp(min=1).to(torch.float32)
    pos = torch.arange(length, device=start.device, dtype=torch.float32)[None, :]
    if offset is not None:
        pos = pos + offset[:, None].to(torch.float32)
    d = pos - start[:, None].to(torch.float32)  # (N, L)
    x = ((src / size)[:, None] * (d + 0.5) - 0.5).clamp(min=0)
    i0 = x.floor().clamp(max=src - 1)
    l1 = x - i0
    i0 = i0.long()
    i1 = (i0 + 1).clamp(max=src - 1)
    valid = ((pos >= start[:, None]) & (pos <= end[:, None])).to(torch.float32)
    cols = torch.arange(src, device=start.device)
    w0 = (i0[..., None] == cols).to(torch.float32) * ((1 - l1) * valid)[..., None]
    w1 = (i1[..., None] == cols).to(torch.float32) * (l1 * valid)[..., None]
    return (w0 + w1).to(dtype)


LAZY_ZEROS_MIN_BYTES = 1 << 22


def zeros_lazy(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros``; on CPU backed by a fresh anonymous memory map, whose pages the
    operating system maps as zeros when first touched instead of being written up front.
    An image-sized mask per detection is mostly zeros: only the pages under the boxes get
    written, which saves most of the time and resident memory of a large paste. (Plain
    4-KiB pages on purpose: a transparent huge page would be zeroed whole on first touch.)
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Small outputs are cheap to zero, and each map counts against the process's limit.
    if device.type != "cpu" or nbytes < LAZY_ZEROS_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    buffer = mmap.mmap(-1, nbytes)
    return torch.frombuffer(buffer, dtype=dtype).view(shape)


def _padded(masks: Tensor, boxes: Tensor, padding: int) -> tuple[Tensor, Tensor]:
    """(N, M + 2p, M + 2p) masks padded with zeros, and the (N, 4) integer boxes grown to
    match, as torchvision's paste prepares them."""
    padded = F.pad(masks[:, 0], (padding, padding, padding, padding))
    grown = expand_boxes(boxes, float(padded.shape[-1]) / masks.shape[-1]).to(torch.int64)
    return padded, grown


def paste_masks_dense(
    masks: Tensor, boxes: Tensor, image_size: tuple[int, int], padding: int = 1
) -> Tensor:
    """:func:`paste_masks` as two batched products over whole images, with no branch on the
    boxes and no host round trip: ``Wy @ mask @ Wx^T`` with (H, M + 2p) and (W, M + 2p) weight
    matrices that are zero outside each box. The form a GPU (one batched product instead of
    a loop over groups) and an ONNX graph want; on a CPU the windowed loop is faster."""
    padded, ib = _padded(masks, boxes, padding)
    side = padded.shape[-1]
    wy = interp_matrix(ib[:, 1], ib[:, 3], image_size[0], side, masks.dtype)
    wx = interp_matrix(ib[:, 0], ib[:, 2], image_size[1], side, masks.dtype)
    return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))[:, None]


def paste_masks(
    masks: Tensor,
    boxes: Tensor,
    image_size: tuple[int, int],
    padding: int = 1,
    group: int = 8,
    budget: int = 1 << 21,
) -> Tensor:
    """Paste (N, 1, M, M) mask probabilities into (N, 1, H, W) image-sized masks.

    Same values as torchvision's ``paste_masks_in_image`` (pad the mask by one pixel, grow
    the box to match, round it to integers, bilinear resize into the box) without a Python
    loop over masks. Bilinear resizing is separable, so the pixels under a box are
    ``Wy @ mask @ Wx^T`` with (h, M) and (w, M) weight matrices. Masks are sorted by box
    height and resized ``group`` at a time (fewer when their rows would exceed ``budget``
    pixels) into a window as large as the group's largest box, which is written in place
    with one indexed copy. The work is proportional to the box areas, not to N x H x W,
    and the rest of the output stays untouched zeros (see ``zeros_lazy``). On a GPU, where
    each group would cost kernel launches and host round trips, all masks are pasted at
    once by :func:`paste_masks_dense`.
    """
    if masks.device.type != "cpu":
        return paste_masks_dense(masks, boxes, image_size, padding)
    n = masks.shape[0]
    h, w = image_size
    out = zeros_lazy((n, 1, h, w), masks.dtype, masks.device)
    if n == 0:
        return out
    padded, ib = _padded(masks, boxes, padding)
    side = padded.shape[-1]
    # The pixels of each box inside the image: from ``lo``, ``extent`` rows and columns.
    lo = torch.stack([ib[:, 1].clamp(min=0), ib[:, 0].clamp(min=0)], 1)
    hi = torch.stack([ib[:, 3].clamp(max=h - 1), ib[:, 2].clamp(max=w - 1)], 1)
    extent = (hi - lo + 1).clamp(min=0)  # (N, 2)
    inside = torch.where(extent.prod(1) > 0)[0]
    # Tallest first, so that the boxes of a group need windows of about the same height.
    order = inside[extent[inside, 0].argsort(descending=True, stable=True)]
    flat = out.view(-1)
    start = 0
    while start < order.numel():
        wh = int(extent[order[start], 0])
        g = max(1, min(group, budget // (wh * w)))
        idx = order[start : start + g]
        start += g
        ww = int(extent[idx, 1].max())
        # Windows of the group's size, shifted where needed to stay inside the image. The
        # weights are zero outside each box, so a window past its box writes only zeros.
        top = lo[idx, 0].clamp(max=h - wh)
        left = lo[idx, 1].clamp(max=w - ww)
        b = ib[idx]
        wy = interp_matrix(b[:, 1], b[:, 3], wh, side, masks.dtype, offset=top)
        wx = interp_matrix(b[:, 0], b[:, 2], ww, side, masks.dtype, offset=left)
        local = torch.bmm(torch.bmm(wy, padded[idx]), wx.transpose(1, 2))  # (g, wh, ww)
        first = (idx * (h * w) + top * w + left)[:, None, None]  # each window's first pixel
        pixel = first + (torch.arange(wh, device=top.device) * w)[:, None]
        flat.index_copy_(0, (pixel + torch.arange(ww, device=top.device)).view(-1), local.view(-1))
    return out
