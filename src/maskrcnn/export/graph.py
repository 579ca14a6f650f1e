"""An export-friendly, single-image inference graph of a :class:`MaskRCNN`.

``ExportableMaskRCNN(model)`` shares the model's weights and computes from one image what
``model.predict([image])[0]`` computes — normalise, resize, pad, backbone + FPN, RPN, box and
mask heads, mask pasting — written so that ``torch.export`` (and the ONNX exporter built on
it) records one graph for every image size:

- the resized size is computed in float64 tensors (as Python computes it) and read out as
  fresh symbolic ints, so no size is baked in and no pyramid level of size 1 is refused;
- no Python branch or loop depends on how many boxes survive a threshold or NMS, so zero
  detections flow through as empty tensors;
- NMS is one operator, ``maskrcnn::nms_first`` (torchvision's NMS, first k kept), applied
  with torchvision's coordinate trick and no branch on the box count; RoIAlign uses the
  pyramid's fixed scales; masks are pasted with one-hot interpolation matrices (no
  ``scatter_add_``, no chunk loop).

The eager model's code is untouched; the tests check that both give the same outputs.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align
from torchvision.ops.poolers import LevelMapper

from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.postprocess import paste_masks_dense
from maskrcnn.model.rpn import flatten_levels

ROI_LEVELS = 4  # P2-P5 feed RoIAlign; P6 ("pool") only the RPN


def as_float(value: int, like: Tensor) -> Tensor:
    """A 0-d float32 tensor holding a (symbolic) int, on ``like``'s device."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def traced_resized_size(image: Tensor, min_size: float, max_size: float) -> tuple[int, int]:
    """(h, w) of ``image`` (3, H, W) resized as ``Preprocessor`` does, as traceable tensor
    arithmetic (``model.preprocess.resized_size`` is the eager form): floor(side * scale),
    at least 1, scale = min(min_size / short side, max_size / long side), in float64 like
    Python (the clamp keeps the short side of a very wide or tall image from becoming 0).

    The sizes are read out of tensors on purpose: under ``torch.export`` they become fresh
    symbols, whose zero/one checks are size-oblivious, rather than long expressions in H and
    W that the exporter would specialise on.
    """
    size = torch.stack(
        [torch.full((), n, dtype=torch.float64, device=image.device) for n in image.shape[1:]]
    )
    scale = torch.minimum(min_size / size.min(), max_size / size.max())
    rh, rw = (size * scale).floor().to(torch.int64).clamp(min=1).unbind()
    # Typed int: under torch.export they are symbolic ints (never int(...): that specialises).
    h, w = cast(int, rh.item()), cast(int, rw.item())
    torch._check(h >= 1)
    torch._check(w >= 1)
    return h, w


def clip_boxes(boxes: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """Clamp (..., 4) xyxy boxes into [0, width] x [0, height] (0-d float tensors), as
    ``torchvision.ops.clip_boxes_to_image``."""
    x = torch.minimum(boxes[..., 0::2].clamp(min=0), width)
    y = torch.minimum(boxes[..., 1::2].clamp(min=0), height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def not_small(boxes: Tensor, min_size: float) -> Tensor:
    """(N,) bool: the (N, 4) xyxy boxes whose sides are both at least ``min_size``."""
    return ((boxes[:, 2] - boxes[:, 0]) >= min_size) & ((boxes[:, 3] - boxes[:, 1]) >= min_size)


@torch.library.custom_op("maskrcnn::nms_first", mutates_args=())
def nms_first(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int) -> Tensor:
    """The first ``k`` of the indices kept by ``torchvision.ops.nms`` (best first), as one
    operator: NMS may stop after ``k`` boxes, which onnxruntime's NonMaxSuppression does
    (``max_output_boxes_per_class``) — much faster when most of many candidates survive."""
    return nms(boxes, scores, iou_threshold)[:k].clone()


@nms_first.register_fake
def _nms_first_fake(boxes: Tensor, scores: Tensor, iou_threshold: float, k: int) -> Tensor:
    # Between 0 and k kept (torchvision's own fake nms claims at least 2).
    count = torch.library.get_ctx().new_dynamic_size(min=0, max=k)
    return boxes.new_empty(count, dtype=torch.long)


def batched_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, k: int
) -> Tensor:
    """The first ``k`` indices (K,) kept by NMS within each group, best score first:
    torchvision's coordinate trick (groups shifted apart by the largest coordinate + 1),
    with no branch on N.

    boxes: (N, 4) xyxy, non-negative; scores: (N,); groups: (N,) int64.
    """
    # max(boxes ∪ {0}) is boxes.max() for clipped boxes, and is defined when N == 0.
    top = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    return nms_first(boxes + (groups.to(boxes) * (top + 1))[:, None], scores, iou_threshold, k)


class ExportableMaskRCNN(nn.Module):
    """``forward(image)``: (3, H, W) float32 RGB in [0, 1], any H and W → ``boxes`` (N, 4)
    float32 xyxy in input pixels, ``labels`` (N,) int64, ``scores`` (N,) float32 (best
    first), ``masks`` (N, 1, H, W) float32 probabilities; N may be 0. The values of
    ``model.predict([image])[0]`` for the model in fp32, eval mode."""

    mean: Tensor  # (3, 1, 1)
    std: Tensor  # (3, 1, 1)
    cell_anchors: Tensor  # (levels, A, 4) zero-centred anchors per pyramid level

    def __init__(self, model: MaskRCNN) -> None:
        super().__init__()
        cfg = model.cfg
        self.backbone = model.backbone
        self.rpn_head = model.rpn.head
        self.rpn_coder = model.rpn.box_coder
        self.roi_heads = model.roi_heads
        self.box_coder = model.roi_heads.box_coder
        self.level_mapper = LevelMapper(2, 2 + ROI_LEVELS - 1)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(3, 1, 1), persistent=False)
        cells = torch.stack(model.rpn.anchor_generator.cell)  # (levels, A, 4)
        self.register_buffer("cell_anchors", cells, persistent=False)
        self.min_size, self.max_size = float(cfg.min_sizes[-1]), float(cfg.max_size)
        self.size_divisible = cfg.size_divisible
        self.pre_nms_top_n = cfg.rpn_pre_nms_top_n_test
        self.post_nms_top_n = cfg.rpn_post_nms_top_n_test
        self.rpn_nms_thresh, self.rpn_score_thresh = cfg.rpn_nms_thresh, cfg.rpn_score_thresh
        self.box_score_thresh, self.box_nms_thresh = cfg.box_score_thresh, cfg.box_nms_thresh
        self.detections_per_img = cfg.box_detections_per_img

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        height, width = image.shape[-2], image.shape[-1]
        x, rh, rw = self.preprocess(image)
        features = list(self.backbone(x[None]).values())
        limits = as_float(rh, x), as_float(rw, x)
        proposals = self.proposals(features, x, *limits)
        boxes, scores, labels = self.detect(features, proposals, *limits)
        probs = self.mask_probs(features, boxes, labels)
        ratio_w, ratio_h = as_float(width, x) / limits[1], as_float(height, x) / limits[0]
        boxes = boxes * torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])
        return boxes, labels, scores, paste_masks_dense(probs, boxes, (height, width))

    def preprocess(self, image: Tensor) -> tuple[Tensor, int, int]:
        """Normalise, resize and zero-pad to a multiple of ``size_divisible``: the image
        (3, H_pad, W_pad) and its resized (h, w) before padding."""
        image = (image - self.mean) / self.std
        rh, rw = traced_resized_size(image, self.min_size, self.max_size)
        image = F.interpolate(image[None], size=(rh, rw), mode="bilinear", align_corners=False)[0]
        d = self.size_divisible
        ph, pw = (rh + d - 1) // d * d, (rw + d - 1) // d * d
        return F.pad(image, (0, pw - rw, 0, ph - rh)), rh, rw

    def anchors(self, x: Tensor, features: list[Tensor]) -> Tensor:
        """(sum_l H_l * W_l * A, 4) anchors for the padded image ``x`` (3, H_pad, W_pad), as
        ``AnchorGenerator`` (stride = padded size // feature size)."""
        out = []
        for base, feature in zip(self.cell_anchors.unbind(), features, strict=True):
            fh, fw = feature.shape[-2], feature.shape[-1]
            stride_h, stride_w = x.shape[-2] // fh, x.shape[-1] // fw
            shifts_x = torch.arange(0, fw, dtype=torch.int32, device=x.device) * stride_w
            shifts_y = torch.arange(0, fh, dtype=torch.int32, device=x.device) * stride_h
            shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1).to(torch.float32)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return torch.cat(out)

    def proposals(self, features: list[Tensor], x: Tensor, rh: Tensor, rw: Tensor) -> Tensor:
        """(P, 4) proposals in resized-image pixels, as ``RegionProposalNetwork``: top-k per
        level, clip, drop tiny and low-score boxes, NMS per level, top-k."""
        logits, deltas = self.rpn_head(features)
        objectness = flatten_levels(logits, 1)[0, :, 0].float()
        deltas_all = flatten_levels(deltas, 4)[0].float()
        boxes = self.rpn_coder.decode(deltas_all, self.anchors(x, features))
        top_idx, levels, offset = [], [], 0
        for level, t in enumerate(logits):
            n = t.shape[1] * t.shape[2] * t.shape[3]
            k = torch.sym_min(self.pre_nms_top_n, n)
            top_idx.append(objectness[offset : offset + n].topk(k).indices + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=x.device))
            offset = offset + n
        idx = torch.cat(top_idx)
        level_ids = torch.cat(levels)
        scores = torch.sigmoid(objectness[idx])
        boxes = clip_boxes(boxes[idx, 0], rh, rw)
        keep = torch.where(not_small(boxes, 1e-3) & (scores >= self.rpn_score_thresh))[0]
        kept = batched_nms(
            boxes[keep], scores[keep], level_ids[keep], self.rpn_nms_thresh, self.post_nms_top_n
        )
        return boxes[keep[kept]]

    def detect(
        self, features: list[Tensor], proposals: Tensor, rh: Tensor, rw: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes (D, 4) in resized pixels, scores (D,), labels (D,) from (P, 4) proposals, as
        ``detect_boxes``: per class, score > threshold, not tiny, NMS; the best D."""
        heads = self.roi_heads
        pooled = self.multiscale_roi_align(features, proposals, 7)
        class_logits, box_regression = heads.box_predictor(heads.box_head(pooled))
        boxes = clip_boxes(self.box_coder.decode(box_regression.float(), proposals), rh, rw)
        scores = F.softmax(class_logits.float(), -1)
        labels = torch.arange(scores.shape[-1], device=boxes.device).view(1, -1).expand_as(scores)
        boxes = boxes[:, 1:].reshape(-1, 4)
        scores = scores[:, 1:].reshape(-1)
        labels = labels[:, 1:].reshape(-1)
        keep = torch.where(scores > self.box_score_thresh)[0]
        keep = keep[not_small(boxes[keep], 1e-2)]
        keep = keep[
            batched_nms(
                boxes[keep], scores[keep], labels[keep], self.box_nms_thresh,
                self.detections_per_img,
            )
        ]
        return boxes[keep], scores[keep], labels[keep]

    def mask_probs(self, features: list[Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        """(D, 1, 28, 28) mask probabilities, each of its box's class (D boxes, D labels)."""
        heads = self.roi_heads
        pooled = self.multiscale_roi_align(features, boxes, 14)
        return heads.mask_predictor.logits_of(heads.mask_head(pooled), labels).float().sigmoid()

    def multiscale_roi_align(self, features: list[Tensor], boxes: Tensor, size: int) -> Tensor:
        """(R, C, size, size) RoIAlign of each (R, 4) box on its FPN level, as torchvision's
        ``MultiScaleRoIAlign`` with the pyramid's scales 1/4 .. 1/32 (the scales it infers,
        and caches, from the first image it sees — unless that image is tiny)."""
        levels = self.level_mapper([boxes])
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
        out = boxes.new_zeros((boxes.shape[0], features[0].shape[1], size, size))
        for level, feature in enumerate(features[:ROI_LEVELS]):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feature, rois[idx], (size, size), 2.0 ** -(level + 2), 2, False)
            out = out.index_put((idx,), pooled.to(out.dtype))
        return out
