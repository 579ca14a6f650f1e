"""Resize, normalise and pad images (and resize their targets) before the network."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from maskrcnn.config import ModelConfig
from maskrcnn.structures.image_batch import ImageBatch


def resize_scale(height: int, width: int, min_size: float, max_size: float) -> float:
    """Factor that brings the short side to ``min_size`` without the long side passing
    ``max_size``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(h, w) of an image of ``height`` x ``width`` resized by ``scale``: floor(side * scale),
    as ``F.interpolate(recompute_scale_factor=True)`` computes it, but at least 1.

    The floor alone gives 0 for the short side of an image whose aspect ratio exceeds
    max_size / min_size (a 1 x 300 strip at min = max = 96), which interpolate refuses."""
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def resize_image(image: Tensor, scale: float) -> Tensor:
    """Bilinear resize of (3, H, W) by ``scale`` to :func:`resized_size`. Interpolating to an
    explicit size samples as ``recompute_scale_factor=True`` does (input / output size)."""
    size = resized_size(int(image.shape[-2]), int(image.shape[-1]), scale)
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_masks(masks: Tensor, scale: float) -> Tensor:
    """Nearest-neighbour resize of (N, H, W) uint8 masks by ``scale`` to
    :func:`resized_size`, the size of the image resized with them."""
    size = resized_size(int(masks.shape[-2]), int(masks.shape[-1]), scale)
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[:, None].float(), size=size)[:, 0].byte()


def scale_boxes(boxes: Tensor, from_size: tuple[int, int], to_size: tuple[int, int]) -> Tensor:
    """Rescale (N, 4) xyxy boxes from an image of ``from_size`` (h, w) to ``to_size``."""
    ratio_h = torch.tensor(to_size[0], dtype=torch.float32, device=boxes.device) / torch.tensor(
        from_size[0], dtype=torch.float32, device=boxes.device
    )
    ratio_w = torch.tensor(to_size[1], dtype=torch.float32, device=boxes.device) / torch.tensor(
        from_size[1], dtype=torch.float32, device=boxes.device
    )
    ratios = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h])
    if not boxes.is_floating_point():  # integer boxes would truncate the ratios to 0 or 1
        boxes = boxes.float()
    return boxes * ratios.to(boxes.dtype)


class Preprocessor:
    """Turns a list of (3, H, W) images in [0, 1] into an :class:`ImageBatch`."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.min_sizes = cfg.min_sizes
        self.max_size = cfg.max_size
        self.mean = cfg.image_mean
        self.std = cfg.image_std
        self.size_divisible = cfg.size_divisible

    def pick_min_size(self, training: bool) -> float:
        if not training:
            return float(self.min_sizes[-1])
        # Drawn even for one choice: the RNG stream stays the same as torchvision's.
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_sizes))).item())
        return float(self.min_sizes[index])

    def __call__(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None, training: bool
    ) -> tuple[ImageBatch, list[dict[str, Tensor]] | None]:
        resized, sizes, originals = [], [], []
        new_targets: list[dict[str, Tensor]] = []
        for i, image in enumerate(images):
            h, w = int(image.shape[-2]), int(image.shape[-1])
            mean = torch.as_tensor(self.mean, dtype=image.dtype, device=image.device)
            std = torch.as_tensor(self.std, dtype=image.dtype, device=image.device)
            image = (image - mean[:, None, None]) / std[:, None, None]
            scale = resize_scale(h, w, self.pick_min_size(training), self.max_size)
            image = resize_image(image, scale)
            new_size = (int(image.shape[-2]), int(image.shape[-1]))
            if targets is not None:
                t = dict(targets[i])
                t["boxes"] = scale_boxes(t["boxes"], (h, w), new_size)
                if "masks" in t:
                    t["masks"] = resize_masks(t["masks"], scale)
                new_targets.append(t)
            resized.append(image)
            sizes.append(new_size)
            originals.append((h, w))
        return ImageBatch(self.pad(resized), sizes, originals), (
            new_targets if targets is not None else None
        )

    def pad(self, images: list[Tensor]) -> Tensor:
        """Zero-pad to the largest size, rounded up to a multiple of ``size_divisible``."""
        d = self.size_divisible
        h = int(math.ceil(max(im.shape[-2] for im in images) / d) * d)
        w = int(math.ceil(max(im.shape[-1] for im in images) / d) * d)
        batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
        for b, im in zip(batch, images, strict=True):
            b[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch
