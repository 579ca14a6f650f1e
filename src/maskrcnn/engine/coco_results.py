"""Model outputs (torchvision format) to COCO results dicts: xywh boxes, compressed RLE masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils

from maskrcnn.structures.local_masks import LocalMasks

MASK_THRESHOLD = 0.5


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """boxes: (N, 4) xyxy → (N, 4) xywh (COCO's bbox format)."""
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=1)


def binarize_masks(masks: torch.Tensor, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """(N, 1, H, W) probabilities or (N, H, W) masks → (N, H, W) bool, ``value > threshold``.

    Binary masks (bool, or uint8 0/1 or 0/255) pass unchanged through the same comparison.
    """
    if masks.ndim == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"masks must be (N, 1, H, W) or (N, H, W), got {tuple(masks.shape)}")
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, 1, H, W) or (N, H, W), got {tuple(masks.shape)}")
    if masks.dtype == torch.bool:
        return masks
    return masks.float() > threshold


def encode_masks(masks: torch.Tensor) -> list[dict[str, Any]]:
    """masks: (N, H, W) bool → N compressed RLEs ``{"size": [H, W], "counts": str}``."""
    rles = []
    for mask in masks.numpy():  # one at a time: memory stays at one (H, W) copy
        rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
        rle["counts"] = rle["counts"].decode("ascii")
        rles.append(rle)
    return rles


def _category_ids(labels: torch.Tensor, label_to_cat_id: Mapping[int, int] | None) -> list[int]:
    label_list = [int(v) for v in labels.tolist()]
    if label_to_cat_id is None:
        return label_list
    unknown = sorted(set(label_list) - set(label_to_cat_id))
    if unknown:
        raise ValueError(f"labels {unknown} have no category id in label_to_cat_id")
    return [label_to_cat_id[v] for v in label_list]


def prediction_to_coco(
    prediction: Mapping[str, Any],
    image_id: int,
    label_to_cat_id: Mapping[int, int] | None = None,
    with_masks: bool = True,
) -> list[dict[str, Any]]:
    """One image's prediction to COCO results dicts.

    prediction: ``boxes`` (N, 4) xyxy, ``labels`` (N,) contiguous labels, ``scores`` (N,), and
    (if ``with_masks``) ``masks`` (N, 1, H, W) probabilities, (N, H, W) binary masks or
    box-local :class:`LocalMasks` (encoded without building full-size masks).
    Each result has ``image_id``, ``category_id``, ``bbox`` [x, y, w, h], ``score`` and, with
    masks, ``segmentation`` (compressed RLE, counts as str so it serialises to JSON).
    """
    boxes = xyxy_to_xywh(prediction["boxes"].detach().cpu().to(torch.float64))
    scores = prediction["scores"].detach().cpu().to(torch.float64).tolist()
    cat_ids = _category_ids(prediction["labels"].detach().cpu(), label_to_cat_id)
    results = [
        {"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score}
        for cat, box, score in zip(cat_ids, boxes.tolist(), scores, strict=True)
    ]
    if with_masks:
        if "masks" not in prediction:
            raise ValueError(f"image {image_id}: segm evaluation needs predicted 'masks'")
        masks = prediction["masks"]
        if isinstance(masks, LocalMasks):
            rles = masks.rles()
        else:
            rles = encode_masks(binarize_masks(masks.detach().cpu()))
        if len(rles) != len(results):
            raise ValueError(f"image {image_id}: {len(rles)} masks for {len(results)} boxes")
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = rle
    return results
