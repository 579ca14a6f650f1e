"""Containers passed between the stages of the model."""

from maskrcnn.structures.detections import Detections
from maskrcnn.structures.image_batch import ImageBatch

__all__ = ["Detections", "ImageBatch"]
