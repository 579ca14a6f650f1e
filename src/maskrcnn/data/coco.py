"""COCO instance-segmentation annotations: polygon/RLE rasterising and a lazy torch Dataset.

The JSON's structure is validated by ``coco_schema``; this module turns valid annotations
into tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors

from maskrcnn.data.coco_schema import (
    IMAGE_KEYS,
    escapes_root,
    iter_structure_problems,
    load_coco_json,
    posix_file_name,
)
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_io import (
    MAX_IMAGE_PIXELS,
    index_by_basename,
    is_file,
    read_image,
    swapped_hint,
)

Target = dict[str, Any]
Transforms = Callable[[tv_tensors.Image, Target], tuple[Any, Any]]

BACKGROUND_NAME = "__background__"


def build_label_map(categories: list[dict[str, Any]]) -> tuple[dict[int, int], list[str]]:
    """Maps COCO category ids, sorted ascending, to contiguous labels ``1..K`` (0 = background).

    Returns ``(label_to_cat_id, class_names)`` with ``class_names[0] == "__background__"``.
    A name shared by several categories gets its id appended (``"facade#0"``, ``"facade#3"``)
    so that every label keeps a distinct name.
    """
    ordered = sorted(categories, key=lambda c: c["id"])
    names = [str(c["name"]) for c in ordered]
    duplicated = {n for n in names if names.count(n) > 1}
    class_names = [BACKGROUND_NAME] + [
        f"{n}#{c['id']}" if n in duplicated else n for n, c in zip(names, ordered, strict=True)
    ]
    label_to_cat_id = {label: c["id"] for label, c in enumerate(ordered, start=1)}
    return label_to_cat_id, class_names


def _clip_half_plane(xy: np.ndarray, axis: int, bound: float, keep_above: bool) -> np.ndarray:
    """One Sutherland–Hodgman step: polygon ``xy`` (K, 2) cut to ``x[axis] >= bound`` (or
    ``<=``). Points outside are replaced by the path along the line, so the winding number of
    every point on the kept side, hence the rasterised mask there, stays the same."""
    if len(xy) == 0:
        return xy
    a = xy[:, axis]
    inside = a >= bound if keep_above else a <= bound
    nxt = np.roll(xy, -1, axis=0)
    crossing = inside != np.roll(inside, -1)
    with np.errstate(all="ignore"):  # t is only used where the edge crosses: no 0 / 0 there
        t = (bound - a) / (nxt[:, axis] - a)
        cut = xy + t[:, None] * (nxt - xy)
    cut[:, axis] = bound
    # For each vertex: itself if inside, then the crossing of its outgoing edge if any.
    return np.stack([xy, cut], axis=1)[np.stack([inside, crossing], axis=1)]


def clip_polygon(polygon: list[Any], height: int, width: int) -> list[float]:
    """``polygon`` ``[x1, y1, ...]`` cut to the box one image size around the image.

    pycocotools' rasteriser walks every pixel step of every edge, in ints: a point 1e8 pixels
    away takes half a minute, a larger one overflows and crashes it. Polygons that stay within
    the box (all real ones) are returned unchanged; for the others the mask inside the image
    is the same up to rounding (new vertices lie on the box, at least one image size away).
    """
    xy = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    low, high = np.array([-width, -height], float), np.array([2 * width, 2 * height], float)
    if ((xy >= low) & (xy <= high)).all():
        return polygon
    for axis in (0, 1):
        xy = _clip_half_plane(xy, axis, low[axis], keep_above=True)
        xy = _clip_half_plane(xy, axis, high[axis], keep_above=False)
    # Coordinates near the float limit make the crossings imprecise, even NaN: such input
    # has no meaningful shape, but it must still reach pycocotools finite and in the box.
    xy = np.clip(np.nan_to_num(xy), low, high)
    if len(xy) < 3:  # wholly outside: a degenerate triangle at the box corner, no pixels
        xy = np.repeat(low[None], 3, axis=0)
    return [float(v) for v in xy.reshape(-1)]


def segmentation_to_rle(segm: list[Any] | dict[str, Any], height: int, width: int) -> Any:
    """Converts a validated COCO segmentation into one compressed RLE dict for pycocotools."""
    if isinstance(segm, list):
        polygons = [clip_polygon(p, height, width) for p in segm]
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return {"size": segm["size"], "counts": segm["counts"]}


class CocoDataset(Dataset[tuple[Any, Any]]):
    """A COCO instance-segmentation dataset, read lazily: one image decoded per ``__getitem__``.

    The JSON is parsed and validated once; masks stay as polygons/RLE until an item is read.
    ``dataset[i]`` is ``(image, target)`` with ``image`` a ``tv_tensors.Image`` uint8
    ``(3, H, W)`` and ``target`` a dict:

    - ``boxes``: ``tv_tensors.BoundingBoxes`` float32 ``(N, 4)``, XYXY, absolute pixels
    - ``labels``: int64 ``(N,)``, contiguous ``1..K`` (see ``label_to_cat_id``)
    - ``masks``: ``tv_tensors.Mask`` uint8 ``(N, H, W)`` with values 0/1
    - ``iscrowd``: int64 ``(N,)``; ``area``: float32 ``(N,)``; ``image_id``: int (COCO id)

    Crowd regions are dropped when ``skip_crowd``. Instances whose box, clipped to the image,
    is empty, or whose mask covers no pixel, are dropped (``maskrcnn data check`` reports
    them). Backslashes in ``file_name`` are read as ``/``. With ``search_subfolders``, an
    image missing at ``image_root/file_name`` is looked up by basename anywhere under
    ``image_root``.

    A ``file_name`` that is absolute or has a ``..`` part is refused at load time unless
    ``allow_outside_root``: an annotation file from elsewhere must not make the loader read
    files outside ``image_root``. Images of more than ``max_image_pixels`` pixels are refused
    when read (``None``: no limit but PIL's own).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path | None = None,
        transforms: Transforms | None = None,
        skip_crowd: bool = True,
        search_subfolders: bool = False,
        allow_outside_root: bool = False,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root) if image_root is not None else self.ann_file.parent
        self.transforms = transforms
        self.skip_crowd = skip_crowd
        self.max_image_pixels = max_image_pixels
        self.coco_json = load_coco_json(self.ann_file)
        for problem in iter_structure_problems(self.coco_json):
            raise DatasetError(f"{self.ann_file}: {problem.message}")
        for img in self.coco_json["images"]:
            if not allow_outside_root and escapes_root(img["file_name"]):
                raise DatasetError(
                    f"{self.ann_file}: image id {img['id']}: file_name {img['file_name']!r} is "
                    f"absolute or has a '..' part, so it may point outside the image root "
                    f"{self.image_root}; if you trust this file, pass allow_outside_root=True "
                    "(config: data.allow_outside_root=true)"
                )
        self._images: list[dict[str, Any]] = list(self.coco_json["images"])
        self.image_ids: list[int] = [img["id"] for img in self._images]
        position = {image_id: k for k, image_id in enumerate(self.image_ids)}
        self._annotations: list[list[dict[str, Any]]] = [[] for _ in self._images]
        for ann in self.coco_json.get("annotations", []):
            self._annotations[position[ann["image_id"]]].append(ann)
        self.label_to_cat_id, self.class_names = build_label_map(self.coco_json["categories"])
        self.cat_id_to_label = {c: label for label, c in self.label_to_cat_id.items()}
        # Built once here rather than lazily so that DataLoader workers inherit it.
        self._basename_index = index_by_basename(self.image_root) if search_subfolders else None

    def __len__(self) -> int:
        return len(self._images)

    def image_info(self, index: int) -> dict[str, Any]:
        """``file_name``, ``height``, ``width`` and ``id`` of image ``index`` from the JSON."""
        img = self._images[index]
        return {key: img[key] for key in IMAGE_KEYS}

    def image_labels(self) -> list[set[int]]:
        """The labels of each image's annotations (crowd regions left out when they are
        skipped), from the JSON (no image is read)."""
        return [
            {self.cat_id_to_label[a["category_id"]] for a in anns
             if not (self.skip_crowd and a.get("iscrowd", 0))}
            for anns in self._annotations
        ]

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the JSON (no image is read)."""
        return [img["width"] / img["height"] for img in self._images]

    def image_path(self, index: int) -> Path:
        """Where image ``index`` is read from (after the basename search, if enabled)."""
        file_name = self._images[index]["file_name"]
        path = self.image_root / posix_file_name(file_name)
        if self._basename_index is None or is_file(path):
            return path
        found = self._basename_index.get(path.name, [])
        if len(found) > 1:
            raise DatasetError(
                f"{self.ann_file}: image id {self.image_ids[index]}: '{file_name}' is not at "
                f"{path} and its basename matches several files: {[str(p) for p in found]}"
            )
        return found[0] if found else path

    def read_image(self, index: int) -> torch.Tensor:
        """Image ``index`` as (3, H, W) uint8, checked against the JSON's size; without the
        transforms. A DatasetError names the file and image id."""
        img = self._images[index]
        path = self.image_path(index)
        try:
            image = read_image(path, self.max_image_pixels)
        except DatasetError as e:
            # The hint helps only a file that is missing, not one that is broken.
            missing = self._basename_index is None and not is_file(path)
            hint = " (try search_subfolders=True)" if missing else ""
            raise DatasetError(f"{self.ann_file}: image id {img['id']}: {e}{hint}") from e
        size, json_size = (image.shape[1], image.shape[2]), (img["height"], img["width"])
        if size != json_size:
            raise DatasetError(
                f"{self.ann_file}: image id {img['id']}: file {self.image_path(index)} is "
                f"{size[0]}x{size[1]} (HxW) but the JSON says {json_size[0]}x{json_size[1]}"
                f"{swapped_hint(size, json_size)}"
            )
        return image

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.read_image(index)
        anns = [
            a for a in self._annotations[index] if not (self.skip_crowd and a.get("iscrowd", 0))
        ]
        target = self._make_target(anns, int(image.shape[1]), int(image.shape[2]))
        target["image_id"] = self.image_ids[index]
        out_image = tv_tensors.Image(image)
        if self.transforms is not None:
            return self.transforms(out_image, target)
        return out_image, target

    def _make_target(self, anns: list[dict[str, Any]], height: int, width: int) -> Target:
        if not anns:
            return _empty_target(height, width)
        rles = [segmentation_to_rle(a["segmentation"], height, width) for a in anns]
        mask_boxes, mask_areas = mask_utils.toBbox(rles), mask_utils.area(rles)
        # float64 until clipped: a valid (finite) but absurd bbox or area overflows float32.
        boxes64 = np.zeros((len(anns), 4), dtype=np.float64)
        areas64 = np.zeros(len(anns), dtype=np.float64)
        for k, ann in enumerate(anns):
            x, y, w, h = ann["bbox"] if ann.get("bbox") is not None else mask_boxes[k]
            boxes64[k] = (x, y, x + w, y + h)
            areas64[k] = ann["area"] if "area" in ann else mask_areas[k]
        boxes64[:, 0::2] = boxes64[:, 0::2].clip(0, width)
        boxes64[:, 1::2] = boxes64[:, 1::2].clip(0, height)
        boxes = boxes64.astype(np.float32)
        areas = areas64.clip(0, np.finfo(np.float32).max).astype(np.float32)
        # An empty mask trains nothing, and the geometric transforms drop it too
        # (refit_instances): drop it here so that the result does not depend on them.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (mask_areas > 0)
        kept_rles = [rle for rle, k in zip(rles, keep, strict=True) if k]
        masks = np.zeros((0, height, width), dtype=np.uint8)
        if kept_rles:
            # decode gives (H, W, N) in Fortran order; one copy makes it (N, H, W) C-contiguous.
            masks = np.ascontiguousarray(mask_utils.decode(kept_rles).transpose(2, 0, 1))
        labels = [self.cat_id_to_label[a["category_id"]] for a in anns]
        crowd = [int(a.get("iscrowd", 0)) for a in anns]
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes[keep]), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(np.asarray(labels, dtype=np.int64)[keep]),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "iscrowd": torch.tensor(np.asarray(crowd, dtype=np.int64)[keep]),
            "area": torch.from_numpy(areas[keep]),
        }


def _empty_target(height: int, width: int) -> Target:
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.zeros((0, 4), dtype=torch.float32), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.zeros((0, height, width), dtype=torch.uint8)),
        "iscrowd": torch.zeros(0, dtype=torch.int64),
        "area": torch.zeros(0, dtype=torch.float32),
    }
