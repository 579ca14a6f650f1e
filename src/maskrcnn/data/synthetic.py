"""A synthetic COCO dataset of coloured shapes, for demos, tests and smoke-training."""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "rectangle", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
# An instance whose visible part falls below this share of its own area (or below
# _MIN_VISIBLE_PIXELS) is dropped: a sliver is not a fair target for a detector.
_MIN_VISIBLE_FRACTION = 0.2
_MIN_VISIBLE_PIXELS = 16
MAX_SIZE = 8192  # pixels a side


@dataclass
class _Shape:
    """One drawn object: its full (unoccluded) mask and how to annotate it."""

    category_id: int
    mask: np.ndarray  # (H, W) bool, before occlusion
    polygon: list[float] | None  # flat [x1, y1, ...] for rectangles/triangles, None for circles
    colour: np.ndarray  # (3,) float


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour gradient plus sinusoidal stripes: ``(size, size, 3)`` float in ~[0, 255]."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    c0, c1 = rng.uniform(0, 255, (2, 3))
    angle, stripe_angle = rng.uniform(0, 2 * math.pi, 2)
    ramp = (xx * math.cos(angle) + yy * math.sin(angle) + 1.5) / 3.0  # in [0, 1]
    image = c0 + (c1 - c0) * ramp[..., None]
    freq = rng.uniform(2, 10)
    phase = rng.uniform(0, 2 * math.pi)
    along = xx * math.cos(stripe_angle) + yy * math.sin(stripe_angle)
    stripes = np.sin(2 * math.pi * freq * along + phase)
    return image + rng.uniform(10, 40) * stripes[..., None]


def _rasterize_polygon(polygon: list[float], size: int) -> np.ndarray:
    # pycocotools' rasteriser, so that decoding the stored polygon gives exactly this mask.
    rle = mask_utils.frPyObjects([polygon], size, size)
    return mask_utils.decode(rle)[:, :, 0].astype(bool)


def _random_polygon(rng: np.random.Generator, category_id: int, size: int) -> list[float]:
    radius = rng.uniform(0.08, 0.28) * size
    if category_id == 2:  # rotated rectangle with aspect ratio up to 1:3
        angle = rng.uniform(0, math.pi / 2)
        half_w, half_h = radius * math.cos(rng.uniform(0.3, 1.2)), radius
        corners = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
        points = np.array([
            (x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle))
            for x, y in corners
        ])
    else:  # triangle: three vertices about 120 degrees apart, jittered
        start = rng.uniform(0, 2 * math.pi)
        angles = start + np.array([0.0, 2.1, 4.2]) + rng.uniform(-0.4, 0.4, 3)
        points = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # Place the shape so that every vertex lies inside the image.
    low, high = -points.min(axis=0), size - points.max(axis=0)
    points = points + rng.uniform(low, high)
    return [round(float(v), 2) for v in points.reshape(-1)]


def _random_shape(rng: np.random.Generator, size: int) -> _Shape:
    category_id = int(rng.integers(1, 4))
    colour = rng.uniform(0, 255, 3)
    if category_id == 1:
        radius = rng.uniform(0.06, 0.25) * size
        cx, cy = rng.uniform(radius, size - radius, 2)
        yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        return _Shape(category_id, mask, None, colour)
    polygon = _random_polygon(rng, category_id, size)
    return _Shape(category_id, _rasterize_polygon(polygon, size), polygon, colour)


def _drawable_shape(rng: np.random.Generator, size: int) -> _Shape:
    """A shape big enough to be kept when nothing hides it: in small images (under 32 px) a
    shape can rasterise to fewer than ``_MIN_VISIBLE_PIXELS`` and an image meant to hold
    objects would hold none. From 64 px on no shape is redrawn (the data are unchanged)."""
    for _ in range(100):
        shape = _random_shape(rng, size)
        if shape.mask.sum() >= _MIN_VISIBLE_PIXELS:
            return shape
    raise ValueError(f"images of {size} px are too small for shapes of {_MIN_VISIBLE_PIXELS} px")


def _encode(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _annotate(shape: _Shape, visible: np.ndarray) -> dict[str, Any]:
    """COCO fields for one instance: a polygon if fully visible and polygonal, else RLE."""
    rle = _encode(visible)
    occluded = bool(visible.sum() < shape.mask.sum())
    segmentation: Any = rle if occluded or shape.polygon is None else [shape.polygon]
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    return {
        "category_id": shape.category_id,
        "segmentation": segmentation,
        "area": float(mask_utils.area(rle)),
        "bbox": bbox,
        "iscrowd": 0,
    }


def _render(rng: np.random.Generator, size: int, n_objects: int) -> tuple[np.ndarray, list[Any]]:
    """Draws ``n_objects`` shapes on a textured background, later ones on top.

    Returns ``(image (size, size, 3) uint8, annotations without ids)``; the visible masks of
    the kept instances are disjoint.
    """
    image = _background(rng, size)
    shapes = [_drawable_shape(rng, size) for _ in range(n_objects)]
    covered = np.zeros((size, size), dtype=bool)
    annotations: list[dict[str, Any]] = []
    # Walk front to back: what the later shapes cover is hidden from the earlier ones.
    for shape in reversed(shapes):
        visible = shape.mask & ~covered
        if visible.sum() < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * shape.mask.sum()):
            continue  # dropped and not drawn: shapes behind it show through
        covered |= shape.mask
        shade = rng.uniform(0.8, 1.2)  # per-shape brightness, so colour alone is not a label
        image[visible] = np.clip(shape.colour * shade, 0, 255)
        annotations.append(_annotate(shape, visible))
    image += rng.normal(0.0, 8.0, image.shape)
    annotations.reverse()
    return np.clip(image, 0, 255).astype(np.uint8), annotations


def _split_seed(seed: int, split_name: str) -> np.random.SeedSequence:
    # Mixing in the split name gives train and val different images from the same --seed.
    return np.random.SeedSequence([seed, zlib.crc32(split_name.encode())])


def make_synthetic_coco(
    out_dir: str | Path,
    num_images: int,
    size: int = 128,
    seed: int = 0,
    split_name: str = "train",
    empty_fraction: float = 0.1,
    max_objects: int = 4,
) -> Path:
    """Writes a COCO dataset of circles, rectangles and triangles (category ids 1, 2, 3).

    Images are ``size×size`` RGB PNGs under ``out_dir/<split_name>/``; annotations go to
    ``out_dir/<split_name>.json`` with file names relative to ``out_dir``. Each image has 1 to
    ``max_objects`` shapes, except ``round(empty_fraction * num_images)`` empty ones. Later
    shapes occlude earlier ones; occluded instances are stored as RLE of their visible part
    (so masks never overlap) and dropped when less than 20% stays visible. Unoccluded
    rectangles/triangles are stored as polygons, circles as compressed RLE. The same
    arguments give byte-identical files. ``split_name`` must be a plain name (no ``/``,
    ``\\`` or ``..``), else ValueError.

    Returns:
        The path of the JSON file.
    """
    if num_images < 0 or size < 16 or max_objects < 1 or not 0.0 <= empty_fraction <= 1.0:
        raise ValueError("need num_images >= 0, size >= 16, max_objects >= 1, "
                         "0 <= empty_fraction <= 1")
    if size > MAX_SIZE:  # each image is drawn in float64: 24 bytes a pixel
        raise ValueError(f"size {size} is more than {MAX_SIZE} pixels a side (an image of "
                         f"{size} px takes {size * size * 24 / 2**30:.0f} GiB while drawn)")
    # The split names a folder and a file inside out_dir: a path would write elsewhere.
    if not split_name or "/" in split_name or "\\" in split_name or ".." in split_name:
        raise ValueError(f"split name {split_name!r} must be a plain name, without '/', '\\' "
                         "or '..'")
    out_dir = Path(out_dir)
    (out_dir / split_name).mkdir(parents=True, exist_ok=True)
    seeds = _split_seed(seed, split_name).spawn(num_images + 1)
    empty = set(np.random.default_rng(seeds[-1]).permutation(num_images)
                [: round(empty_fraction * num_images)].tolist())
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for k in range(num_images):
        rng = np.random.default_rng(seeds[k])
        n_objects = 0 if k in empty else int(rng.integers(1, max_objects + 1))
        pixels, image_anns = _render(rng, size, n_objects)
        file_name = f"{split_name}/{k:06d}.png"
        Image.fromarray(pixels).save(out_dir / file_name, format="PNG", compress_level=1)
        images.append({"id": k + 1, "file_name": file_name, "height": size, "width": size})
        for ann in image_anns:
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1, **ann})
    coco = {
        "info": {"description": "maskrcnn synthetic shapes", "seed": seed, "split": split_name},
        "images": images,
        "annotations": annotations,
        "categories": CATEGORIES,
    }
    json_path = out_dir / f"{split_name}.json"
    json_path.write_text(json.dumps(coco))
    return json_path
