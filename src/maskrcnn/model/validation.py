"""Checks of the model's inputs, with errors that say which image and what is wrong."""

from __future__ import annotations

import torch
from torch import Tensor


def check_images(images: object) -> list[Tensor]:
    """Images must be a non-empty list of (3, H, W) floating-point tensors."""
    if isinstance(images, Tensor):
        raise ValueError(
            "images must be a list of (3, H, W) tensors, got a single tensor of shape "
            f"{tuple(images.shape)}; wrap it in a list (or use list(batch) for a 4-D batch)"
        )
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError("images must be a non-empty list of (3, H, W) float tensors")
    for i, image in enumerate(images):
        if not isinstance(image, Tensor):
            raise ValueError(f"image {i}: expected a torch.Tensor, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i}: expected shape (3, H, W), got {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(
                f"image {i}: expected a float tensor with values in [0, 1], got {image.dtype} "
                "(convert uint8 images with image.float() / 255)"
            )
        if image.dtype != torch.float32:  # the weights are float32 (autocast casts inside)
            raise ValueError(
                f"image {i}: expected float32 values in [0, 1], got {image.dtype} "
                "(convert with image.float())"
            )
        if image.shape[1] == 0 or image.shape[2] == 0:
            raise ValueError(f"image {i}: empty image of shape {tuple(image.shape)}")
    return list(images)


def check_targets(
    images: list[Tensor], targets: object, num_classes: int
) -> list[dict[str, Tensor]]:
    """Targets must hold boxes (N, 4) with positive width and height, labels (N,) in
    [1, num_classes) and masks (N, H, W) of the image's size."""
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        n = len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__
        raise ValueError(
            f"training needs one target dict per image: {len(images)} images, targets: {n}"
        )
    for i, (image, t) in enumerate(zip(images, targets, strict=True)):
        for key in ("boxes", "labels", "masks"):
            if not isinstance(t, dict) or key not in t:
                raise ValueError(f"target {i}: missing {key!r}")
        boxes, labels, masks = t["boxes"], t["labels"], t["masks"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target {i}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
        n = boxes.shape[0]
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            j = int(torch.where(degenerate)[0][0])
            raise ValueError(
                f"target {i}: box {j} {boxes[j].tolist()} is degenerate "
                "(x2 <= x1 or y2 <= y1); boxes are xyxy in pixels"
            )
        if labels.dtype != torch.int64:
            raise ValueError(
                f"target {i}: labels must be int64 class indices, got {labels.dtype} "
                "(convert with labels.long())"
            )
        if labels.shape != (n,):
            raise ValueError(
                f"target {i}: labels must have shape ({n},), got {tuple(labels.shape)}"
            )
        if n and (labels.min() < 1 or labels.max() >= num_classes):
            raise ValueError(
                f"target {i}: labels must be in [1, {num_classes - 1}] "
                f"(0 is background), got {labels.tolist()}"
            )
        if masks.shape != (n, *image.shape[-2:]):
            raise ValueError(
                f"target {i}: masks must have shape ({n}, {image.shape[-2]}, "
                f"{image.shape[-1]}) to match boxes and image, got "
                f"{tuple(masks.shape)}"
            )
    return list(targets)
