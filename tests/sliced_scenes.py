"""Scenes with known objects and a detector that sees exactly what a tile shows, for testing
sliced prediction without a trained model: object ``k`` is painted with channel 0 = 255
and its id in channels 1 and 2 (high and low byte), so the detector finds each object's
visible pixels, cut where the tile cuts it."""

from __future__ import annotations

import torch
from torch import Tensor

from maskrcnn.structures.detections import Detections
from maskrcnn.structures.local_masks import LocalMasks


def paint(image: Tensor, object_id: int, mask: Tensor, x: int = 0, y: int = 0) -> None:
    """Paints object ``object_id`` (1..65535) where ``mask`` is set, at (x, y)."""
    h, w = mask.shape
    region = image[:, y : y + h, x : x + w]
    region[0][mask] = 255
    region[1][mask] = object_id // 256
    region[2][mask] = object_id % 256


def rect(h: int, w: int) -> Tensor:
    return torch.ones((h, w), dtype=torch.bool)


def disc(radius: int) -> Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return r[:, None] ** 2 + r[None, :] ** 2 <= radius**2


def object_ids(image: Tensor) -> Tensor:
    """(H, W) int64 ids of a painted image (uint8, or float in [0, 1]); 0 = background."""
    if image.dtype != torch.uint8:
        image = image.mul(255).round_().to(torch.uint8)
    ids = image[1].long() * 256 + image[2].long()
    return torch.where(image[0] > 127, ids, torch.zeros_like(ids))


def see(images: list[Tensor]) -> list[tuple[Detections, LocalMasks]]:
    """The perfect detector: one detection per object id visible in each image, its mask the
    visible pixels; scores rise with the visible area (a cut piece scores lower)."""
    out = []
    for image in images:
        ids = object_ids(image)
        local = []
        boxes, scores, labels = [], [], []
        where = ids.nonzero()  # (P, 2) rows and columns of object pixels
        values = ids[where[:, 0], where[:, 1]]
        for k in values.unique().tolist():
            pixels = where[values == k]
            y0, x0 = (int(v) for v in pixels.min(0).values)
            y1, x1 = (int(v) + 1 for v in pixels.max(0).values)
            crop = ids[y0:y1, x0:x1] == k
            local.append((crop, (x0, y0)))
            boxes.append([x0, y0, x1, y1])
            scores.append(min(0.99, 0.5 + int(crop.sum()) / 20000))
            labels.append(1 + k % 2)
        size = (int(image.shape[-2]), int(image.shape[-1]))
        masks = LocalMasks([c for c, _ in local],
                           torch.tensor([o for _, o in local], dtype=torch.int64).reshape(-1, 2),
                           size)
        out.append((Detections(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                               torch.tensor(scores), torch.tensor(labels, dtype=torch.int64)),
                    masks))
    return out
