"""Images as users hold them (a path, a PIL image, a numpy array, a tensor) → the float
tensors the model takes."""

from __future__ import annotations

from pathlib import Path
from typing import TypeAlias

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from maskrcnn.data.image_io import read_image, to_rgb, upright

ImageInput: TypeAlias = str | Path | Image.Image | np.ndarray | Tensor


def to_float_image(image: ImageInput) -> Tensor:
    """:func:`to_image_tensor` as float32 in [0, 1]."""
    tensor = to_image_tensor(image)
    return tensor.float() / 255 if tensor.dtype == torch.uint8 else tensor


def to_image_tensor(image: ImageInput) -> Tensor:
    """A path, PIL image, (H, W[, C]) numpy array (uint8, or float in [0, 1]) or (3, H, W)
    or (1, H, W) tensor (uint8, or float in [0, 1]) → (3, H, W) uint8, or float32 in [0, 1]
    when given as float (a large image stays one byte a channel), on the CPU unless the
    tensor given was elsewhere. Grey images become RGB; an alpha channel is
    dropped; 16-bit grey keeps its top 8 bits and EXIF orientation is applied, whether given
    as a path or a PIL image."""
    if isinstance(image, (str, Path)):
        return read_image(image)
    if isinstance(image, Image.Image):
        # As read_image reads a file: upright by its EXIF orientation, and converted without
        # PIL's own convert("RGB"), which saturates 16-bit grey.
        image = np.asarray(to_rgb(upright(image)))
    if isinstance(image, np.ndarray):
        array = image[..., None] if image.ndim == 2 else image
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"numpy images must be (H, W) or (H, W, 1|3|4), got {image.shape}")
        # A copy: arrays may be read-only (PIL's are), which torch.from_numpy warns about.
        tensor = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1)
        return _checked(tensor.expand(3, -1, -1), "numpy array")
    if isinstance(image, Tensor):
        tensor = image.as_subclass(Tensor)
        if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
            raise ValueError(
                f"tensor images must be (3, H, W) or grey (1, H, W), got "
                f"{tuple(tensor.shape)}; pass a 4-D batch as a list of images"
            )
        return _checked(tensor.expand(3, -1, -1), "tensor")
    raise TypeError(
        f"unsupported image type {type(image).__name__}: use a path, PIL image, "
        "numpy HWC array or (3, H, W) tensor"
    )


def _checked(tensor: Tensor, kind: str) -> Tensor:
    if tensor.dtype == torch.uint8:
        return tensor
    if not tensor.is_floating_point():
        raise ValueError(f"{kind} images must be uint8 or float in [0, 1], got {tensor.dtype}")
    if tensor.numel() and (tensor.min() < 0 or tensor.max() > 1):
        raise ValueError(
            f"float {kind} images must be in [0, 1], got values in "
            f"[{float(tensor.min()):g}, {float(tensor.max()):g}] (divide 0-255 values by 255)"
        )
    return tensor.float()
