"""Mask R-CNN building blocks."""

from maskrcnn.model.mask_rcnn import MaskRCNN

__all__ = ["MaskRCNN"]
