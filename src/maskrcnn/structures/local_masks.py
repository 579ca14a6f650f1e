"""Binary instance masks stored over their own boxes, for images too large for N × H × W.

An image of 20,000 × 20,000 pixels holds 400 MB per dense boolean mask; a thousand small
objects would need 400 GB. Each mask here is a crop: ``crops[i]`` (h_i, w_i) bool whose
top-left pixel sits at ``origins[i] = (x, y)`` of an image of ``image_size`` (H, W). Memory
is the sum of the boxes' areas. COCO RLE is written straight from the crops (no full-size
mask is built), and :meth:`to_dense` gives the usual (N, H, W) tensor where it fits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor


@dataclass
class LocalMasks:
    """N box-local binary masks of an image of ``image_size`` (H, W): ``crops[i]`` is a
    (h_i, w_i) bool tensor whose pixel [0, 0] is image pixel (x, y) = ``origins[i]``; every
    crop lies inside the image."""

    crops: list[Tensor]
    origins: Tensor  # (N, 2) int64, (x, y)
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        h, w = self.image_size
        if self.origins.shape != (len(self.crops), 2):
            raise ValueError(f"origins must be ({len(self.crops)}, 2), got "
                             f"{tuple(self.origins.shape)}")
        for crop, (x, y) in zip(self.crops, self.origins.tolist(), strict=True):
            ch, cw = crop.shape
            if x < 0 or y < 0 or x + cw > w or y + ch > h:
                raise ValueError(f"a {ch}x{cw} crop at (x={x}, y={y}) leaves the {h}x{w} image")

    def __len__(self) -> int:
        return len(self.crops)

    def __iter__(self) -> Iterator[tuple[Tensor, tuple[int, int]]]:
        """(crop, (x, y)) of each mask."""
        return zip(self.crops, [(int(x), int(y)) for x, y in self.origins.tolist()], strict=True)

    @classmethod
    def empty(cls, image_size: tuple[int, int]) -> LocalMasks:
        return cls([], torch.zeros((0, 2), dtype=torch.int64), image_size)

    @classmethod
    def from_dense(cls, masks: Tensor) -> LocalMasks:
        """(N, H, W) or (N, 1, H, W) binary masks, each cropped to the pixels it covers (an
        empty mask keeps a 0 × 0 crop at (0, 0))."""
        masks = masks.reshape(-1, *masks.shape[-2:]).bool()
        crops, origins = [], []
        for m in masks:
            rows = torch.where(m.any(1))[0]
            cols = torch.where(m.any(0))[0]
            if rows.numel() == 0:
                crops.append(torch.zeros((0, 0), dtype=torch.bool))
                origins.append((0, 0))
                continue
            y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
            crops.append(m[y0:y1, x0:x1].clone())
            origins.append((x0, y0))
        return cls(crops, torch.tensor(origins, dtype=torch.int64).reshape(-1, 2),
                   (int(masks.shape[-2]), int(masks.shape[-1])))

    @classmethod
    def cat(cls, parts: Sequence[LocalMasks], image_size: tuple[int, int]) -> LocalMasks:
        crops = [c for p in parts for c in p.crops]
        origins = [p.origins for p in parts]
        return cls(crops, torch.cat(origins) if origins else torch.zeros((0, 2), dtype=torch.int64),
                   image_size)

    def select(self, index: Sequence[int] | Tensor) -> LocalMasks:
        idx = [int(i) for i in index]
        return LocalMasks([self.crops[i] for i in idx], self.origins[idx].reshape(-1, 2),
                          self.image_size)

    def areas(self) -> Tensor:
        """(N,) int64 pixel counts."""
        return torch.tensor([int(c.sum()) for c in self.crops], dtype=torch.int64)

    def to_dense(self) -> Tensor:
        """(N, H, W) bool; N × H × W bytes, so only for images of ordinary size."""
        h, w = self.image_size
        out = torch.zeros((len(self), h, w), dtype=torch.bool)
        for k, (crop, (x, y)) in enumerate(self):
            out[k, y : y + crop.shape[0], x : x + crop.shape[1]] = crop
        return out

    def rle(self, k: int) -> dict[str, Any]:
        """Mask ``k`` as COCO compressed RLE (``counts`` a str), built from the crop's runs:
        the same result as ``pycocotools.mask.encode`` of the dense mask."""
        return crop_to_rle(self.crops[k], tuple(self.origins[k].tolist()), self.image_size)

    def rles(self) -> list[dict[str, Any]]:
        return [self.rle(k) for k in range(len(self))]


def crop_to_rle(crop: Tensor, origin: Sequence[int], image_size: tuple[int, int]) -> dict[str, Any]:
    """COCO compressed RLE of a mask that is ``crop`` at ``origin`` (x, y) and zero elsewhere
    in an image of ``image_size`` (H, W). COCO counts runs column by column (Fortran order),
    alternating zeros and ones from a run of zeros; a crop's runs are found per column and
    shifted to the image's flat index, and runs that continue into the next column (a crop
    spanning the full height) are joined."""
    h, w = image_size
    x0, y0 = int(origin[0]), int(origin[1])
    a = crop.cpu().bool().numpy().astype(np.int8)
    ch = a.shape[0]
    if a.size == 0 or not a.any():
        counts = [h * w]
    else:
        # Each column padded with a zero above and below: runs never cross columns here.
        padded = np.zeros((a.shape[1], ch + 2), dtype=np.int8)
        padded[:, 1:-1] = a.T
        d = np.diff(padded, axis=1)  # (cw, ch + 1): +1 where a run starts, -1 after it ends
        cols_s, rows_s = np.nonzero(d == 1)
        cols_e, rows_e = np.nonzero(d == -1)
        starts = (x0 + cols_s).astype(np.int64) * h + y0 + rows_s
        ends = (x0 + cols_e).astype(np.int64) * h + y0 + rows_e
        # A run ending where the next one starts (bottom of one column, top of the next).
        join = np.nonzero(ends[:-1] == starts[1:])[0]
        starts = np.delete(starts, join + 1)
        ends = np.delete(ends, join)
        bounds = np.empty(2 * starts.size + 2, dtype=np.int64)
        bounds[0] = 0
        bounds[1:-1:2] = starts
        bounds[2:-1:2] = ends
        bounds[-1] = h * w
        counts = np.diff(bounds).tolist()
        if counts[-1] == 0:  # the mask reaches the last pixel
            counts.pop()
    rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    rle["counts"] = rle["counts"].decode("ascii")
    return rle
