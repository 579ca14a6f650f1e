"""Region proposal network: objectness and box deltas per anchor, proposals, losses."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import (
    Conv2dNormActivation,
    batched_nms,
    box_iou,
    clip_boxes_to_image,
    remove_small_boxes,
)

from maskrcnn.config import ModelConfig
from maskrcnn.model.anchors import AnchorGenerator
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.losses import rpn_loss
from maskrcnn.model.matcher import Matcher
from maskrcnn.model.sampler import BalancedSampler
from maskrcnn.structures.image_batch import ImageBatch


class RPNHead(nn.Module):
    """Shared 3x3 conv(s) (``conv_depth``: 1 in v1, 2 in v2), then per-anchor objectness
    logit and 4 box deltas, on every level."""

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *(
                Conv2dNormActivation(in_channels, in_channels, norm_layer=None)
                for _ in range(conv_depth)
            )
        )
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.constant_(layer.bias, 0)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """features: per level (B, C, H, W) → objectness (B, A, H, W), deltas (B, 4A, H, W)."""
        logits, deltas = [], []
        for feature in features:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_levels(per_level: list[Tensor], channels: int) -> Tensor:
    """(B, A*C, H, W) per level → (B, sum(H*W*A), C), ordered (level, y, x, anchor)."""
    out = []
    for t in per_level:
        b, _, h, w = t.shape
        out.append(t.view(b, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, channels))
    return torch.cat(out, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposals per image (at most ``post_nms_top_n``) and, in training, the RPN losses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.anchor_generator = AnchorGenerator(cfg.anchor_sizes, cfg.aspect_ratios)
        self.head = RPNHead(
            cfg.fpn_channels,
            self.anchor_generator.num_anchors_per_location,
            conv_depth=2 if cfg.arch == "v2" else 1,
        )
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg.rpn_fg_iou_thresh, cfg.rpn_bg_iou_thresh, True)
        self.sampler = BalancedSampler(cfg.rpn_batch_size_per_image, cfg.rpn_positive_fraction)
        self.pre_nms_top_n = {
            "train": cfg.rpn_pre_nms_top_n_train,
            "test": cfg.rpn_pre_nms_top_n_test,
        }
        self.post_nms_top_n = {
            "train": cfg.rpn_post_nms_top_n_train,
            "test": cfg.rpn_post_nms_top_n_test,
        }
        self.nms_thresh = cfg.rpn_nms_thresh
        self.score_thresh = cfg.rpn_score_thresh

    def forward(
        self, images: ImageBatch, features: list[Tensor], gt_boxes: list[Tensor] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Returns proposals per image (P_i, 4) xyxy in resized-image pixels, and losses
        (empty dict unless ``gt_boxes`` is given)."""
        logits, deltas = self.head(features)
        feature_sizes = [(f.shape[-2], f.shape[-1]) for f in features]
        anchors_per_level = self.anchor_generator(
            images.padded_size, feature_sizes, torch.float32, features[0].device
        )
        anchors = torch.cat(anchors_per_level)
        num_per_level = [a.shape[0] for a in anchors_per_level]
        num_images = len(images.image_sizes)
        # float32 from here on, whatever precision the convolutions ran in
        objectness = flatten_levels(logits, 1).squeeze(-1).float()  # (B, A_total)
        box_deltas = flatten_levels(deltas, 4).float()  # (B, A_total, 4)
        proposals = self.box_coder.decode(
            box_deltas.detach().reshape(-1, 4), anchors.repeat(num_images, 1)
        ).view(num_images, -1, 4)
        boxes = self.filter_proposals(
            proposals, objectness.detach(), images.image_sizes, num_per_level
        )
        losses: dict[str, Tensor] = {}
        if gt_boxes is not None:
            labels, targets = self.assign_targets(anchors, gt_boxes)
            pos, neg = self.sampler(labels)
            loss_obj, loss_box = rpn_loss(
                objectness.reshape(-1),
                box_deltas.reshape(-1, 4),
                torch.cat(labels),
                torch.cat(targets),
                torch.cat(pos),
                torch.cat(neg),
            )
            losses = {"loss_objectness": loss_obj, "loss_rpn_box_reg": loss_box}
        return boxes, losses

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_sizes: list[tuple[int, int]],
        num_per_level: list[int],
    ) -> list[Tensor]:
        """Top-k per level, clip, drop tiny and low-score boxes, NMS per level, top-k."""
        mode = "train" if self.training else "test"
        top_idx, levels, offset = [], [], 0
        for level, (ob, n) in enumerate(
            zip(objectness.split(num_per_level, 1), num_per_level, strict=True)
        ):
            k = min(self.pre_nms_top_n[mode], n)
            idx = ob.topk(k, dim=1).indices
            top_idx.append(idx + offset)
            levels.append(torch.full((k,), level, dtype=torch.int64, device=proposals.device))
            offset += n
        idx = torch.cat(top_idx, dim=1)
        level_ids = torch.cat(levels)
        batch = torch.arange(proposals.shape[0], device=proposals.device)[:, None]
        scores = torch.sigmoid(objectness[batch, idx])
        candidates = proposals[batch, idx]
        out = []
        for boxes, sc, image_size in zip(candidates, scores, image_sizes, strict=True):
            boxes = clip_boxes_to_image(boxes, image_size)
            keep = remove_small_boxes(boxes, 1e-3)
            keep = keep[sc[keep] >= self.score_thresh]
            keep = keep[batched_nms(boxes[keep], sc[keep], level_ids[keep], self.nms_thresh)]
            out.append(boxes[keep[: self.post_nms_top_n[mode]]])
        return out

    def assign_targets(
        self, anchors: Tensor, gt_boxes: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per image: anchor labels (A,) float in {1, 0, -1} and encoded targets (A, 4)."""
        labels, targets = [], []
        for gt in gt_boxes:
            if gt.numel() == 0:
                labels.append(
                    torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
                )
                targets.append(torch.zeros_like(anchors))
                continue
            matched = self.matcher(box_iou(gt, anchors))
            lab = (matched >= 0).to(torch.float32)
            lab[matched == -2] = -1.0
            labels.append(lab)
            targets.append(self.box_coder.encode(gt[matched.clamp(min=0)], anchors))
        return labels, targets
