"""Model configuration.

Fields shared with torchvision's ``MaskRCNN`` keyword arguments keep torchvision's names and
default values, so a torchvision recipe translates field by field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2", "vgg16")


@dataclass(frozen=True)
class LossWeights:
    """Multipliers of the five losses; the model returns each loss already weighted."""

    classifier: float = 1.0
    box_reg: float = 1.0
    mask: float = 1.0
    objectness: float = 1.0
    rpn_box_reg: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a Mask R-CNN network and its pre/post-processing."""

    num_classes: int = 91
    backbone: str = "resnet50"
    backbone_weights: str | None = None
    trainable_backbone_layers: int = 3
    fpn_channels: int = 256
    # pre-processing (GeneralizedRCNNTransform)
    min_size: int | tuple[int, ...] = 800
    max_size: int = 1333
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    size_divisible: int = 32
    # anchors
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256, 512)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    # RPN
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_score_thresh: float = 0.0
    # box branch
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    bbox_reg_weights: tuple[float, float, float, float] | None = None
    # mask branch
    class_agnostic_masks: bool = False
    mask_threshold: float = 0.5
    loss_weights: LossWeights = field(default_factory=LossWeights)

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {BACKBONES}")
        if self.num_classes < 2:
            raise ValueError(
                f"num_classes must count the background too (>= 2), got {self.num_classes}"
            )
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise ValueError(
                f"trainable_backbone_layers must be in [0, 5], got {self.trainable_backbone_layers}"
            )
        if isinstance(self.loss_weights, dict):  # built from YAML
            object.__setattr__(self, "loss_weights", LossWeights(**self.loss_weights))

    @property
    def min_sizes(self) -> tuple[int, ...]:
        """Training picks one of these at random per image; evaluation uses the last."""
        return (self.min_size,) if isinstance(self.min_size, int) else tuple(self.min_size)
