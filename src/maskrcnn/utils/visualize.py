"""Pictures of instances: masks in colour with outlines, boxes, class names and scores."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from maskrcnn.data.image_input import ImageInput, to_image_tensor
from maskrcnn.structures.local_masks import LocalMasks
from maskrcnn.utils.atomic import atomic_write

ALPHA = 0.45


def instance_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct, saturated colours; instance ``k`` always gets the same one
    (hues spaced by the golden ratio)."""
    colors = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((0.11 + 0.618034 * k) % 1.0, 0.85, 0.95)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def _relative_luminance(color: tuple[int, int, int]) -> float:
    """WCAG 2 relative luminance of an sRGB colour, 0 (black) to 1 (white)."""
    lin = [c / 3294.6 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in color]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    """``color`` mixed with just enough white to contrast 5:1 with the black label plate:
    saturated blues and purples are otherwise hard to read on black. 5 rather than WCAG AA's
    4.5, because the anti-aliased strokes of a small font rarely reach their full colour."""
    for step in range(11):
        t = step / 10
        mixed = (
            round(color[0] + (255 - color[0]) * t),
            round(color[1] + (255 - color[1]) * t),
            round(color[2] + (255 - color[2]) * t),
        )
        if (_relative_luminance(mixed) + 0.05) / 0.05 >= 5.0:
            return mixed
    return (255, 255, 255)


def to_uint8_hwc(image: ImageInput) -> np.ndarray:
    """Any image :func:`~maskrcnn.data.image_input.to_float_image` takes (path, PIL image, grey,
    RGB or RGBA numpy array, (3, H, W) or (1, H, W) tensor; uint8 or float in [0, 1])
    → (H, W, 3) uint8, the same picture the predictor sees."""
    tensor = to_image_tensor(image.detach() if isinstance(image, Tensor) else image).cpu()
    if tensor.dtype != torch.uint8:
        tensor = (tensor * 255).round().to(torch.uint8)
    return tensor.permute(1, 2, 0).numpy().copy()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` (H, W) bool that touch a pixel outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


MAX_CAPTION_PX = 40


def draw_instances(
    image: ImageInput,
    boxes: Tensor | None = None,
    labels: Tensor | None = None,
    scores: Tensor | None = None,
    masks: Tensor | LocalMasks | None = None,
    class_names: Sequence[str] | None = None,
    mask_threshold: float = 0.5,
    min_side: int = 0,
) -> Image.Image:
    """Overlay of instances on ``image`` (any form :func:`to_uint8_hwc` takes). boxes:
    (N, 4) xyxy pixels; labels: (N,); scores: (N,) or None (ground truth); masks:
    (N, 1, H, W) or (N, H, W), probabilities or binary, or box-local :class:`LocalMasks`.
    Each instance's mask is tinted in its colour and outlined, one box-sized window at a
    time (memory: the picture and the largest box); its box is drawn and labelled with the
    class name and score on a dark plate, readable on any background. An image whose short
    side is under ``min_side`` is enlarged by a whole factor first, so that captions of
    small images stay readable."""
    canvas = to_uint8_hwc(image)
    n = 0 if boxes is None else int(boxes.shape[0])
    colors = instance_colors(n)
    factor = max(1, -(-min_side // min(canvas.shape[:2])))
    if factor > 1:
        canvas = canvas.repeat(factor, axis=0).repeat(factor, axis=1)
        boxes = boxes * factor if boxes is not None else None
    if masks is not None and n:
        if not isinstance(masks, LocalMasks):
            dense = masks.detach().cpu().reshape(n, *masks.shape[-2:]) > mask_threshold
            masks = LocalMasks.from_dense(dense)
        for k, (crop, (x, y)) in enumerate(masks):
            _tint(canvas, crop.numpy(), x, y, factor, colors[k])
    out = Image.fromarray(canvas)
    draw = ImageDraw.Draw(out)
    # A fortieth of the short side, within 10-40 px: on a 20,000-pixel aerial picture with
    # thousands of small objects, 500-px captions would cover everything.
    font = ImageFont.load_default(size=min(MAX_CAPTION_PX, max(10, min(out.size) // 40)))
    for k in range(n):
        assert boxes is not None
        x1, y1, x2, y2 = (float(v) for v in boxes[k])
        draw.rectangle((x1, y1, x2, y2), outline=colors[k], width=2)
        text = _caption(k, labels, scores, class_names)
        if text:
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            shift = bottom - top + 4
            ty = y1 - shift if y1 - shift >= 0 else y1
            # Shifted left near the right edge, so that the caption is never cut off.
            tx = max(2 - left, min(x1, out.width - 3 - right))
            draw.rectangle((tx + left - 2, ty, tx + right + 2, ty + shift), fill=(0, 0, 0))
            draw.text((tx, ty + 1), text, fill=text_color(colors[k]), font=font)
    return out


def _tint(
    canvas: np.ndarray, crop: np.ndarray, x: int, y: int, factor: int,
    color: tuple[int, int, int],
) -> None:
    """Blends ``color`` into ``canvas`` (H, W, 3) uint8 under ``crop`` (a mask whose pixel
    [0, 0] is canvas pixel (x, y) before enlarging by ``factor``) and draws its outline, in
    a window one pixel larger than the crop on each side (clipped to the canvas, whose edge
    is not an outline)."""
    if crop.size == 0 or not crop.any():
        return
    if factor > 1:
        crop = crop.repeat(factor, axis=0).repeat(factor, axis=1)
        x, y = x * factor, y * factor
    h, w = canvas.shape[:2]
    ch, cw = crop.shape
    ry0, rx0 = max(y - 1, 0), max(x - 1, 0)
    ry1, rx1 = min(y + ch + 1, h), min(x + cw + 1, w)
    region = np.zeros((ry1 - ry0, rx1 - rx0), dtype=bool)
    region[y - ry0 : y - ry0 + ch, x - rx0 : x - rx0 + cw] = crop
    view = canvas[ry0:ry1, rx0:rx1]
    tint = np.array(color, dtype=np.float32)
    view[region] = ((1 - ALPHA) * view[region] + ALPHA * tint).round().astype(np.uint8)
    view[_outline(region)] = color


def _caption(
    k: int, labels: Tensor | None, scores: Tensor | None, class_names: Sequence[str] | None
) -> str:
    parts = []
    if labels is not None:
        label = int(labels[k])
        parts.append(class_names[label] if class_names and label < len(class_names) else str(label))
    if scores is not None:
        parts.append(f"{float(scores[k]):.2f}")
    return " ".join(parts)


def side_by_side(
    left: Image.Image, right: Image.Image, titles: tuple[str, str] = ("ground truth", "prediction")
) -> Image.Image:
    """Two pictures next to each other with a title above each."""
    pad = 24
    out = Image.new(
        "RGB", (left.width + right.width + 8, max(left.height, right.height) + pad), (255, 255, 255)
    )
    out.paste(left, (0, pad))
    out.paste(right, (left.width + 8, pad))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=14)
    draw.text((4, 4), titles[0], fill=(0, 0, 0), font=font)
    draw.text((left.width + 12, 4), titles[1], fill=(0, 0, 0), font=font)
    return out


def save_overlay(image: Image.Image, path: str | Path) -> Path:
    """Write ``image`` to ``path`` (format from its extension) atomically: a temporary file
    in the same folder renamed over ``path``, so a crash never leaves half a picture."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}")
    with atomic_write(path) as tmp:
        image.save(tmp, format=image_format)
    return path
