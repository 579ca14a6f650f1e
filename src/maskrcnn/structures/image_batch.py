"""A padded batch of images of different sizes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ImageBatch:
    """Images resized, normalised and zero-padded to one tensor.

    tensor: (B, 3, H_pad, W_pad) float; image_sizes: per image (h, w) after resizing and
    before padding; original_sizes: per image (h, w) as given by the caller.
    """

    tensor: Tensor
    image_sizes: list[tuple[int, int]]
    original_sizes: list[tuple[int, int]]

    @property
    def padded_size(self) -> tuple[int, int]:
        return (int(self.tensor.shape[-2]), int(self.tensor.shape[-1]))

    def __len__(self) -> int:
        return len(self.image_sizes)
