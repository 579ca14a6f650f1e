"""Containers passed between the stages of the model."""

from maskrcnn.structures.image_batch import ImageBatch

__all__ = ["ImageBatch"]
