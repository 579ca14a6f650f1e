"""RoI heads: box branch (two-MLP head, classifier, box regressor) and mask branch."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.ops import box_iou

from maskrcnn.config import ModelConfig
from maskrcnn.model.box_coder import BoxCoder
from maskrcnn.model.losses import fastrcnn_loss, mask_targets, maskrcnn_loss
from maskrcnn.model.mask_head import MaskHead, MaskPredictor
from maskrcnn.model.matcher import Matcher
from maskrcnn.model.pooler import MultiLevelRoIAlign, poolable
from maskrcnn.model.postprocess import detect_boxes
from maskrcnn.model.sampler import BalancedSampler
from maskrcnn.structures.detections import Detections


class TwoMLPHead(nn.Module):
    """(R, C, 7, 7) pooled features → (R, representation) through fc6 and fc7."""

    def __init__(self, in_features: int, representation: int = 1024) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, representation)
        self.fc7 = nn.Linear(representation, representation)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(start_dim=1)))))


class BoxPredictor(nn.Module):
    """Class logits (R, C) and class-specific box deltas (R, 4*C)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class TrainingSamples:
    """Sampled proposals of a batch with their targets (all lists are per image)."""

    def __init__(
        self,
        proposals: list[Tensor],
        labels: list[Tensor],
        matched_idxs: list[Tensor],
        regression_targets: Tensor,
    ) -> None:
        self.proposals = proposals
        self.labels = labels
        self.matched_idxs = matched_idxs
        self.regression_targets = regression_targets


class RoIHeads(nn.Module):
    """Detections per image from proposals; in training, the box and mask losses."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.fpn_channels
        self.box_roi_pool = MultiLevelRoIAlign(output_size=7, sampling_ratio=2)
        self.box_head: nn.Module
        if cfg.arch == "v2":  # torchvision's four 3x3 convs with BatchNorm, then one fc
            self.box_head = FastRCNNConvFCHead((ch, 7, 7), [256] * 4, [1024], nn.BatchNorm2d)
        else:
            self.box_head = TwoMLPHead(ch * 7 * 7, 1024)
        self.box_predictor = BoxPredictor(1024, cfg.num_classes)
        self.mask_roi_pool = MultiLevelRoIAlign(output_size=14, sampling_ratio=2)
        # The mask branch is as wide as the FPN (256 in torchvision's layout).
        self.mask_head = MaskHead(
            ch, (ch,) * 4, norm_layer=nn.BatchNorm2d if cfg.arch == "v2" else None
        )
        self.mask_predictor = MaskPredictor(
            ch, ch, 1 if cfg.class_agnostic_masks else cfg.num_classes
        )
        self.box_coder = BoxCoder(cfg.bbox_reg_weights or (10.0, 10.0, 5.0, 5.0))
        self.matcher = Matcher(cfg.box_fg_iou_thresh, cfg.box_bg_iou_thresh, False)
        self.sampler = BalancedSampler(cfg.box_batch_size_per_image, cfg.box_positive_fraction)
        self.score_thresh = cfg.box_score_thresh
        self.nms_thresh = cfg.box_nms_thresh
        self.detections_per_img = cfg.box_detections_per_img
        # (C,) weights of the classes in the classification loss, set by the trainer from
        # cfg.class_loss_weights (which names classes); not part of the weights.
        self.class_weights: Tensor | None
        self.register_buffer("class_weights", None, persistent=False)

    def forward(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        features = poolable(features)
        if targets is not None:
            return [], self.losses(features, proposals, image_sizes, targets)
        return self.detect(features, proposals, image_sizes), {}

    def box_logits(
        self,
        features: OrderedDict[str, Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> tuple[Tensor, Tensor]:
        x = self.box_head(self.box_roi_pool(features, boxes, image_sizes))
        class_logits, box_regression = self.box_predictor(x)
        return class_logits.float(), box_regression.float()

    def mask_logits(
        self,
        features: OrderedDict[str, Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        labels: Tensor,
    ) -> Tensor:
        """(sum D_i, 1, 28, 28) mask logits for ``boxes`` given per image, each of the class
        in ``labels`` (sum D_i,)."""
        x = self.mask_head(self.mask_roi_pool(features, boxes, image_sizes))
        return self.mask_predictor.logits_of(x, labels).float()

    def detect_boxes(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[Detections]:
        """The box branch alone: the detections of each image."""
        class_logits, box_regression = self.box_logits(features, proposals, image_sizes)
        return detect_boxes(
            class_logits,
            box_regression,
            proposals,
            image_sizes,
            self.box_coder,
            self.score_thresh,
            self.nms_thresh,
            self.detections_per_img,
        )

    def detect(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        """Per image: boxes (D, 4), labels (D,), scores (D,), masks (D, 1, 28, 28) probs."""
        dets = self.detect_boxes(features, proposals, image_sizes)
        boxes = [d.boxes for d in dets]
        labels = torch.cat([d.labels for d in dets])
        probs = self.mask_logits(features, boxes, image_sizes, labels).sigmoid()
        return with_masks(dets, probs)

    def losses(
        self,
        features: OrderedDict[str, Tensor],
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        s = self.sample(proposals, targets)
        class_logits, box_regression = self.box_logits(features, s.proposals, image_sizes)
        loss_cls, loss_box = fastrcnn_loss(
            class_logits, box_regression, torch.cat(s.labels), s.regression_targets,
            self.class_weights,
        )
        pos = [torch.where(lab > 0)[0] for lab in s.labels]
        pos_boxes = [p[i] for p, i in zip(s.proposals, pos, strict=True)]
        pos_matched = [m[i] for m, i in zip(s.matched_idxs, pos, strict=True)]
        gt_labels = torch.cat([t["labels"][m] for t, m in zip(targets, pos_matched, strict=True)])
        logits = self.mask_logits(features, pos_boxes, image_sizes, gt_labels)
        mask_t = mask_targets(
            [t["masks"] for t in targets], pos_boxes, pos_matched, logits.shape[-1]
        )
        return {
            "loss_classifier": loss_cls,
            "loss_box_reg": loss_box,
            "loss_mask": maskrcnn_loss(logits, gt_labels, mask_t),
        }

    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> TrainingSamples:
        """Add the ground-truth boxes to the proposals, match, sample, encode targets."""
        props, labels, matched, gt_for_props = [], [], [], []
        for p, t in zip(proposals, targets, strict=True):
            gt = t["boxes"].to(p.dtype)
            p = torch.cat([p, gt])
            if gt.numel() == 0:
                m = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                lab = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                gt = p.new_zeros((1, 4))
            else:
                raw = self.matcher(box_iou(gt, p))
                m = raw.clamp(min=0)
                lab = t["labels"][m].to(torch.int64)
                lab[raw == -1] = 0
                lab[raw == -2] = -1
            props.append(p)
            labels.append(lab)
            matched.append(m)
            gt_for_props.append(gt)
        pos, neg = self.sampler(labels)
        keep = [torch.where(a | b)[0] for a, b in zip(pos, neg, strict=True)]
        props = [p[k] for p, k in zip(props, keep, strict=True)]
        labels = [lab[k] for lab, k in zip(labels, keep, strict=True)]
        matched = [m[k] for m, k in zip(matched, keep, strict=True)]
        reg = self.box_coder.encode(
            torch.cat([g[m] for g, m in zip(gt_for_props, matched, strict=True)]), torch.cat(props)
        )
        return TrainingSamples(props, labels, matched, reg)


def with_masks(dets: list[Detections], probs: Tensor) -> list[dict[str, Tensor]]:
    """torchvision's per-image output dicts: ``dets`` with their (sum D_i, 1, M, M) mask
    probabilities ``probs`` in the same order."""
    counts = [d.boxes.shape[0] for d in dets]
    return [
        {"boxes": d.boxes, "labels": d.labels, "scores": d.scores, "masks": m}
        for d, m in zip(dets, probs.split(counts), strict=True)
    ]
