"""Test-time augmentation: flips and scales, boxes merged across views, masks averaged.

Flow (per batch of images)::

    for each view (identity x hflip x vflip x scales):
        flip image -> preprocess at min_size*s, max_size*s -> backbone -> RPN -> box branch
        boxes: view pixels -> original pixels (un-scale, then un-flip)
    merge the boxes of all views (per-class NMS or weighted box fusion)
    for each view: merged boxes -> view pixels -> mask head on that view's features
        -> 28x28 probabilities un-flipped (box-relative: scale needs nothing)
    average the 28x28 probabilities over views -> paste once at the original size
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

from maskrcnn.config import ModelConfig
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.model.preprocess import Preprocessor, scale_boxes
from maskrcnn.structures.detections import Detections
from maskrcnn.structures.image_batch import ImageBatch

MERGES = ("nms", "wbf")


def flip_boxes(boxes: Tensor, size: tuple[int, int], hflip: bool, vflip: bool) -> Tensor:
    """Mirror (N, 4) xyxy boxes inside an image of ``size`` (h, w): x -> w - x, y -> h - y.

    Box edges are continuous coordinates, so pixel column i (covering [i, i + 1]) lands on
    column w - 1 - i, exactly where ``Tensor.flip`` moves it. Its own inverse.
    """
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    h, w = size
    if hflip:
        x1, x2 = w - x2, w - x1
    if vflip:
        y1, y2 = h - y2, h - y1
    return torch.stack([x1, y1, x2, y2], dim=1)


@dataclass(frozen=True)
class View:
    """One augmented view: an optional horizontal and vertical flip of the input image, and
    a scale of the model's target size (``min_size * scale``, ``max_size * scale``)."""

    hflip: bool = False
    vflip: bool = False
    scale: float = 1.0

    @property
    def is_identity(self) -> bool:
        return not self.hflip and not self.vflip and self.scale == 1.0

    def flip(self, x: Tensor) -> Tensor:
        """Flips the last two axes of (..., H, W) as the view does (vflip: H, hflip: W).

        Used for images (3, H, W) and for box-relative masks (N, 1, M, M); its own inverse.
        """
        dims = [d for d, on in ((-2, self.vflip), (-1, self.hflip)) if on]
        return x.flip(dims) if dims else x

    def preprocessor(self, model: MaskRCNN) -> Preprocessor:
        """The model's own pre-processing, at this view's target size."""
        if self.scale == 1.0:
            return model.preprocess
        cfg = model.cfg
        scaled: ModelConfig = dataclasses.replace(
            cfg,
            min_size=max(1, round(cfg.min_sizes[-1] * self.scale)),
            max_size=max(1, round(cfg.max_size * self.scale)),
        )
        return Preprocessor(scaled)

    def prepare(self, model: MaskRCNN, images: list[Tensor]) -> ImageBatch:
        """Images (3, H, W) float in [0, 1] → the view's batch: flipped, resized to the view's
        target size, normalised, padded. ``original_sizes`` stay those of the inputs."""
        batch, _ = self.preprocessor(model)([self.flip(im) for im in images], None, False)
        return batch

    def boxes_to_view(
        self, boxes: Tensor, original_size: tuple[int, int], view_size: tuple[int, int]
    ) -> Tensor:
        """(N, 4) xyxy in original-image pixels → pixels of the view's resized image."""
        flipped = flip_boxes(boxes, original_size, self.hflip, self.vflip)
        return scale_boxes(flipped, original_size, view_size)

    def boxes_from_view(
        self, boxes: Tensor, view_size: tuple[int, int], original_size: tuple[int, int]
    ) -> Tensor:
        """(N, 4) xyxy in the view's resized image → original-image pixels (un-scale, un-flip)."""
        scaled = scale_boxes(boxes, view_size, original_size)
        return flip_boxes(scaled, original_size, self.hflip, self.vflip)

    def masks_from_view(self, probs: Tensor) -> Tensor:
        """(N, 1, M, M) box-relative mask probabilities predicted in this view → the original
        orientation. A flipped view sees the object mirrored inside its (mirrored) box, so the
        grid is flipped back on the same axis; scaling leaves a box-relative grid unchanged."""
        return self.flip(probs)


@dataclass(frozen=True)
class TTAConfig:
    """Which views to run and how to merge their boxes.

    Views: identity x optional hflip x optional vflip x ``scales``. ``merge``: ``"nms"``
    (per-class NMS over all views' boxes) or ``"wbf"`` (weighted box fusion); ``nms_thresh``
    is the IoU above which two boxes of a class are the same object.
    """

    hflip: bool = True
    vflip: bool = False
    scales: tuple[float, ...] = (1.0,)
    merge: str = "nms"
    nms_thresh: float = 0.5

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {self.merge!r}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers: {self.scales}")
        if not 0.0 < self.nms_thresh <= 1.0:
            raise ValueError(f"nms_thresh must be in (0, 1], got {self.nms_thresh}")
        object.__setattr__(self, "scales", tuple(float(s) for s in self.scales))

    def views(self) -> list[View]:
        hflips = (False, True) if self.hflip else (False,)
        vflips = (False, True) if self.vflip else (False,)
        return [View(h, v, s) for s in self.scales for v in vflips for h in hflips]


@dataclass
class ViewResult:
    """One view's pooled feature levels (see ``poolable``) and, per image, its box
    detections in the view's resized pixels."""

    view: View
    features: OrderedDict[str, Tensor]
    batch: ImageBatch
    detections: list[Detections]

    def in_original(self) -> list[Detections]:
        """Per image the detections with their boxes in original-image pixels."""
        return [
            d._replace(boxes=self.view.boxes_from_view(d.boxes, size, orig))
            for d, size, orig in zip(
                self.detections, self.batch.image_sizes, self.batch.original_sizes, strict=True
            )
        ]

    def to_view(self, boxes: list[Tensor]) -> list[Tensor]:
        """Per image (N, 4) original-image boxes → this view's pixels."""
        return [
            self.view.boxes_to_view(b, orig, size)
            for b, orig, size in zip(
                boxes, self.batch.original_sizes, self.batch.image_sizes, strict=True
            )
        ]


def run_view(model: MaskRCNN, images: list[Tensor], view: View) -> ViewResult:
    """The first stage of ``model.predict`` (backbone, RPN, box branch) on the view of
    ``images``."""
    batch = view.prepare(model, images)
    features, detections = model.detect_boxes(batch)
    return ViewResult(view, features, batch, detections)


def merge_nms(dets: Detections, iou_thresh: float) -> Detections:
    """Per-class NMS over the detections of all views → the kept ones, best score first."""
    return dets.select(batched_nms(dets.boxes, dets.scores, dets.labels, iou_thresh))


def merge_wbf(dets: Detections, iou_thresh: float, num_views: int) -> Detections:
    """Weighted box fusion of the boxes of all views, vectorised.

    Clusters: per-class NMS picks the cluster heads; every box joins the head of its class it
    overlaps most (NMS guarantees IoU > ``iou_thresh`` with at least one). A cluster's box is
    the score-weighted mean of its boxes; its score is the mean score times
    min(count, num_views) / num_views, as in Solovyev et al., so an object seen in only one
    view of several is down-weighted. Returns the K clusters, best first.
    """
    boxes, scores, labels = dets
    if boxes.shape[0] == 0:
        return dets
    heads = batched_nms(boxes, scores, labels, iou_thresh)
    iou = box_iou(boxes, boxes[heads])  # (N, K)
    iou[labels[:, None] != labels[heads][None, :]] = -1.0
    cluster = iou.argmax(dim=1)
    k = heads.shape[0]
    weight = scores.new_zeros(k).index_add_(0, cluster, scores)
    fused = boxes.new_zeros((k, 4)).index_add_(0, cluster, boxes * scores[:, None])
    fused = fused / weight.clamp(min=1e-12)[:, None]
    count = scores.new_zeros(k).index_add_(0, cluster, torch.ones_like(scores))
    fused_scores = weight / count.clamp(min=float(num_views))
    order = fused_scores.argsort(descending=True, stable=True)
    return Detections(fused[order], fused_scores[order], labels[heads][order])


def merge_views(
    results: list[ViewResult], cfg: TTAConfig, max_detections: int
) -> list[Detections]:
    """Per image the detections of all views merged, in original pixels, best first."""
    per_view = [r.in_original() for r in results]
    merged = []
    for i in range(len(results[0].detections)):
        views = [v[i] for v in per_view]
        dets = Detections(
            torch.cat([d.boxes for d in views]),
            torch.cat([d.scores for d in views]),
            torch.cat([d.labels for d in views]),
        )
        if len(results) > 1:
            if cfg.merge == "nms":
                dets = merge_nms(dets, cfg.nms_thresh)
            else:
                dets = merge_wbf(dets, cfg.nms_thresh, len(results))
        merged.append(dets.select(slice(max_detections)))
    return merged


def average_mask_probs(
    model: MaskRCNN, results: list[ViewResult], view_boxes: list[list[Tensor]], labels: list[Tensor]
) -> list[Tensor]:
    """Mask probabilities averaged over views, per image (N_i, 1, 28, 28), box-relative in the
    original orientation. view_boxes[v][i]: (N_i, 4) the same N_i objects in view v's pixels;
    labels[i]: (N_i,) their classes (selects the mask channel)."""
    all_labels = torch.cat(labels)
    total: Tensor | None = None
    for result, boxes in zip(results, view_boxes, strict=True):
        probs = model.mask_probs(result.features, boxes, result.batch.image_sizes, all_labels)
        probs = result.view.masks_from_view(probs)
        total = probs if total is None else total + probs
    assert total is not None
    return list((total / len(results)).split([lab.shape[0] for lab in labels]))


def tta_box_probs(
    model: MaskRCNN, images: list[Tensor], cfg: TTAConfig
) -> list[tuple[Detections, Tensor]]:
    """Per image the merged detections in input-image pixels, best first, and their (N, 1,
    28, 28) box-relative mask probabilities averaged over the views: :func:`tta_predict`
    before pasting (sliced prediction pastes each mask over its own box instead)."""
    results = [run_view(model, images, v) for v in cfg.views()]
    merged = merge_views(results, cfg, model.roi_heads.detections_per_img)
    boxes = [m.boxes for m in merged]
    labels = [m.labels for m in merged]
    # With one view nothing was merged: its own boxes, so that the identity view alone gives
    # the plain model's output bit for bit (no round trip through original pixels).
    if len(results) == 1:
        view_boxes = [[d.boxes for d in results[0].detections]]
    else:
        view_boxes = [r.to_view(boxes) for r in results]
    probs = average_mask_probs(model, results, view_boxes, labels)
    return list(zip(merged, probs, strict=True))


def tta_predict(model: MaskRCNN, images: list[Tensor], cfg: TTAConfig) -> list[dict[str, Tensor]]:
    """``model.predict`` with test-time augmentation (``model`` in eval mode, called without
    gradients): images (3, H, W) float in [0, 1] → per image ``boxes`` (N, 4), ``labels``
    (N,), ``scores`` (N,), ``masks`` (N, 1, H, W) float probabilities, in input-image pixels
    (torchvision's format), best score first."""
    return [
        {"boxes": m.boxes, "labels": m.labels, "scores": m.scores,
         "masks": paste_masks(p, m.boxes, (im.shape[-2], im.shape[-1]))}
        for (m, p), im in zip(tta_box_probs(model, images, cfg), images, strict=True)
    ]
