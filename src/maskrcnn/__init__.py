"""maskrcnn: Mask R-CNN instance segmentation, a drop-in for torchvision's model."""

from maskrcnn.config import LossWeights, ModelConfig
from maskrcnn.model.mask_rcnn import MaskRCNN

__all__ = ["LossWeights", "MaskRCNN", "ModelConfig"]
__version__ = "0.1.0"
