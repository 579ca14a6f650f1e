"""The Mask R-CNN network: pre-processing, backbone + FPN, RPN, RoI heads, post-processing."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from maskrcnn.config import ModelConfig
from maskrcnn.model.backbone import build_backbone
from maskrcnn.model.fast import (
    cast_autocast_weights,
    default_fast_precision,
    fold_batchnorm,
)
from maskrcnn.model.pooler import poolable
from maskrcnn.model.postprocess import paste_masks
from maskrcnn.model.preprocess import Preprocessor, scale_boxes
from maskrcnn.model.roi_heads import RoIHeads, with_masks
from maskrcnn.model.rpn import RegionProposalNetwork
from maskrcnn.model.validation import check_images, check_targets
from maskrcnn.structures.detections import Detections
from maskrcnn.structures.image_batch import ImageBatch
from maskrcnn.utils.precision import DTYPES, autocast

LOSS_WEIGHT_NAMES = {
    "loss_classifier": "classifier",
    "loss_box_reg": "box_reg",
    "loss_mask": "mask",
    "loss_objectness": "objectness",
    "loss_rpn_box_reg": "rpn_box_reg",
}


class MaskRCNN(nn.Module):
    """Mask R-CNN with torchvision's interface and state-dict layout.

    Eval: ``model(images)`` with images a list of (3, H, W) float tensors in [0, 1] returns
    per image a dict with ``boxes`` (N, 4) xyxy, ``labels`` (N,) int64, ``scores`` (N,),
    ``masks`` (N, 1, H, W) float probabilities, in the input image's coordinates.

    Train: ``model(images, targets)``, each target with ``boxes`` (N, 4) xyxy, ``labels`` (N,)
    and ``masks`` (N, H, W) uint8, returns the losses ``loss_classifier``, ``loss_box_reg``,
    ``loss_mask``, ``loss_objectness``, ``loss_rpn_box_reg``, each multiplied by its weight in
    ``cfg.loss_weights`` — their sum is the objective.
    """

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.preprocess = Preprocessor(self.cfg)
        self.backbone = build_backbone(self.cfg)
        self.rpn = RegionProposalNetwork(self.cfg)
        self.roi_heads = RoIHeads(self.cfg)
        self.inference_precision = "fp32"
        self.autocast_precision = "fp32"  # of the float parts (all but an int8 backbone)
        self.channels_last = False
        self.optimized = False  # optimize_for_inference changed the weights for good

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> list[dict[str, Tensor]] | dict[str, Tensor]:
        images = check_images(images)
        if self.training:
            if targets is None:
                raise ValueError(
                    "in training mode the model needs targets; call model.eval() for inference"
                )
            return self.losses(images, check_targets(images, targets, self.cfg.num_classes))
        return self.predict(images)

    def losses(self, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        batch, resized = self.preprocess(images, targets, training=True)
        assert resized is not None
        features = self.backbone(batch.tensor)
        gt_boxes = [t["boxes"] for t in resized]
        proposals, losses = self.rpn(batch, list(features.values()), gt_boxes)
        _, head_losses = self.roi_heads(features, proposals, batch.image_sizes, resized)
        losses.update(head_losses)
        weights = self.cfg.loss_weights
        return {k: v * getattr(weights, LOSS_WEIGHT_NAMES[k]) for k, v in losses.items()}

    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        batch, _ = self.preprocess(images, None, training=False)
        features, dets = self.detect_boxes(batch)
        labels = torch.cat([d.labels for d in dets])
        probs = self.mask_probs(features, [d.boxes for d in dets], batch.image_sizes, labels)
        return self.to_input_coordinates(with_masks(dets, probs), batch)

    def detect_boxes(self, batch: ImageBatch) -> tuple[OrderedDict[str, Tensor], list[Detections]]:
        """The first stage of :meth:`predict` on a pre-processed batch: backbone, RPN and box
        branch, in predict's memory layout and precision. Returns the feature levels in the
        form RoIAlign reads (for :meth:`mask_probs`) and each image's detections in the
        batch's resized pixels. Test-time augmentation runs it once per view."""
        x = batch.tensor
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.autocast_precision, x.device):
            features = self.backbone(x)
            proposals, _ = self.rpn(batch, list(features.values()))
            features = poolable(features)  # converted once, for boxes and masks
            return features, self.roi_heads.detect_boxes(features, proposals, batch.image_sizes)

    def mask_probs(
        self,
        features: OrderedDict[str, Tensor],
        boxes: list[Tensor],
        image_sizes: list[tuple[int, int]],
        labels: Tensor,
    ) -> Tensor:
        """The second stage of :meth:`predict`: (sum N_i, 1, 28, 28) box-relative mask
        probabilities of ``boxes`` (per image, resized pixels) on ``features`` from
        :meth:`detect_boxes`, each of its class in ``labels`` (sum N_i,)."""
        with autocast(self.autocast_precision, labels.device):
            return self.roi_heads.mask_logits(features, boxes, image_sizes, labels).sigmoid()

    def optimize_for_inference(
        self, precision: str = "auto", channels_last: bool = True,
        calibration: Sequence[Tensor] | None = None,
    ) -> MaskRCNN:
        """Switch this model, in place, to the fast inference path: frozen BatchNorm folded
        into the convolutions (the model can no longer be trained or saved in torchvision's
        layout), channels-last memory layout, and autocast in ``precision`` (``auto``: bf16
        on a CPU with native bf16, fp16 on CUDA, else fp32; ``fp32`` keeps full precision).
        ``int8`` (CPU, needs torchao): the backbone and FPN quantized to int8 with activation
        ranges observed on ``calibration`` (images (3, H, W) float in [0, 1], as ``predict``
        takes them; a few dozen like the data), the rest as ``auto`` on the CPU; see
        ``maskrcnn.model.int8``. Boxes, masks and scores stay float32; decoding and
        post-processing run in float32."""
        device = next(self.parameters()).device
        if precision == "auto":
            precision = default_fast_precision(device)
        if precision not in ("fp32", "bf16", "fp16", "int8"):
            raise ValueError(
                f"precision must be auto, fp32, bf16, fp16 or int8, got {precision!r}"
            )
        if self.optimized:
            if (precision, channels_last) == (self.inference_precision, self.channels_last):
                return self
            raise ValueError(
                f"this model is already optimized for {self.inference_precision}: its weights "
                "were changed in place; optimize a copy of the original model instead "
                "(copy.deepcopy before the first call)"
            )
        int8_backbone = None
        if precision == "int8":
            # Everything that can fail happens before the model changes.
            if device.type != "cpu":
                raise ValueError(f"int8 runs on the CPU; this model is on {device}")
            if not calibration:
                raise ValueError("int8 needs calibration images: "
                                 "optimize_for_inference('int8', calibration=[...])")
            from maskrcnn.model.int8 import quantize_backbone

            batches = [self.preprocess([check_images([im])[0].to(device)], None,
                                       training=False)[0].tensor for im in calibration]
            int8_backbone = quantize_backbone(self.backbone, batches)
        self.optimized = True
        self.eval()
        fold_batchnorm(self)  # the backbone's norms, and in v2 those of the FPN and heads
        floats = precision
        if int8_backbone is not None:
            # Same call and outputs as the float backbone (training is refused from here on).
            self.backbone = int8_backbone  # type: ignore[assignment]
            floats = default_fast_precision(device)
        if floats != "fp32":
            cast_autocast_weights(self, DTYPES[floats])
        self.inference_precision = precision
        self.autocast_precision = floats
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)
        return self

    def train(self, mode: bool = True) -> MaskRCNN:
        if mode and self.optimized:
            raise ValueError(
                "this model was switched to the fast inference path (optimize_for_inference): "
                "its norms are folded into the weights, so it can no longer be trained or "
                "saved in torchvision's layout; train a copy made before the switch"
            )
        return super().train(mode)

    @staticmethod
    def to_input_coordinates(
        detections: list[dict[str, Tensor]], batch: ImageBatch
    ) -> list[dict[str, Tensor]]:
        """Scale boxes back to each input image and paste masks at its size."""
        for det, size, original in zip(
            detections, batch.image_sizes, batch.original_sizes, strict=True
        ):
            det["boxes"] = scale_boxes(det["boxes"], size, original)
            det["masks"] = paste_masks(det["masks"], det["boxes"], original)
        return detections

    @torch.no_grad()
    def infer(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Inference without gradients, whatever the module's mode."""
        was_training = self.training
        self.eval()
        try:
            return self.predict(check_images(images))
        finally:
            self.train(was_training)
