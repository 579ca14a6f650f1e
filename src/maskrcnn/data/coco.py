"""COCO instance-segmentation annotations: structural validation and a lazy torch Dataset."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors

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
_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation")
_CATEGORY_KEYS = ("id", "name")
# pycocotools stores run lengths as uint32: an image can have at most this many pixels.
MAX_MASK_PIXELS = 2**32 - 1
_MAX_NAME_BYTES = 255  # NAME_MAX on Linux and macOS; NTFS allows 255 UTF-16 units


class Problem(NamedTuple):
    """One structural defect of a COCO dict; ``CocoDataset`` refuses to load any of them."""

    code: str
    message: str
    image_id: int | None = None
    ann_id: int | None = None


def load_coco_json(ann_file: str | Path) -> dict[str, Any]:
    """Parses a COCO JSON file; raises DatasetError for a missing file or malformed JSON."""
    ann_file = Path(ann_file)
    try:
        with ann_file.open("rb") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"{ann_file}: annotation file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: cannot read annotation file ({e})") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: malformed JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise DatasetError(f"{ann_file}: top level must be a JSON object, got {kind}")
    return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Exact types, not isinstance: bool is an int subclass but never a valid coordinate, and
# this test runs once per polygon coordinate, so it must be cheap.
_NUMBER_TYPES = frozenset({int, float})


def _is_number(value: object) -> bool:
    return type(value) in _NUMBER_TYPES


def _finite_sum(values: list[Any]) -> bool:
    # One sum catches any inf or NaN far faster than a test per value.
    try:
        return math.isfinite(sum(values))
    except OverflowError:  # an int too large for a float
        return False


def _polygon_problem(parts: list[Any]) -> str | None:
    if not parts:
        return "empty segmentation (no polygon and no RLE)"
    for k, part in enumerate(parts):
        if not isinstance(part, list) or not all(_is_number(v) for v in part):
            return f"polygon {k} is not a flat list of numbers [x1, y1, x2, y2, ...]"
        if len(part) % 2:
            return f"polygon {k} has an odd number of coordinates ({len(part)})"
        if len(part) < 6:
            return f"polygon {k} has {len(part) // 2} points; a polygon needs at least 3"
        if not _finite_sum(part):
            return f"polygon {k} has non-finite coordinates"
    return None


def rle_string_counts(counts: str) -> np.ndarray | None:
    """Decodes pycocotools' compressed RLE string into run lengths, or None if malformed.

    Each run is a little-endian group of 5-bit digits (chars ``48 + value``, bit 0x20 = "more
    digits follow", 0x10 in the last digit = negative); from the third run on, runs are
    stored as differences to the run two places before. Checked here because pycocotools'
    decoder trusts the string and writes past its buffer when the runs add up to too much.
    """
    if not counts or not counts.isascii():
        return None
    codes = np.frombuffer(counts.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48
    if codes.min() < 0 or codes.max() > 63 or codes[-1] & 0x20:
        return None
    ends = (codes & 0x20) == 0
    group = np.concatenate(([0], np.cumsum(ends)[:-1]))
    digit = np.arange(codes.size) - np.flatnonzero(np.concatenate(([True], ends[:-1])))[group]
    if digit.max() > 7:  # 8 digits = 40 bits: more than any image has pixels
        return None
    runs = np.zeros(int(ends.sum()), dtype=np.int64)
    np.add.at(runs, group, (codes & 0x1F) << (5 * digit))
    negative = (codes[ends] & 0x10) != 0
    runs[negative] |= -1 << (5 * (digit[ends][negative] + 1))
    runs[1::2] = np.cumsum(runs[1::2])
    runs[2::2] = np.cumsum(runs[2::2])
    return runs


def segmentation_problem(segm: object, height: int, width: int) -> str | None:
    """Says why ``segm`` is not a usable COCO segmentation for an image of ``height×width``.

    Accepts a list of polygons ``[[x1, y1, x2, y2, ...], ...]`` (at least 3 points each) or an
    RLE dict ``{"size": [height, width], "counts": list[int] | str}``. Returns None when fine.
    """
    if isinstance(segm, list):
        return _polygon_problem(segm)
    if not isinstance(segm, dict):
        return f"segmentation must be a polygon list or an RLE dict, got {type(segm).__name__}"
    size, counts = segm.get("size"), segm.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        return "RLE 'size' must be [height, width]"
    if list(size) != [height, width]:
        return f"RLE size {size} differs from the image size [{height}, {width}]"
    if isinstance(counts, list):
        if not all(_is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
            return "uncompressed RLE 'counts' must be non-negative ints summing to height*width"
        return None
    if not isinstance(counts, str):
        return "RLE 'counts' must be a list of ints or a compressed string"
    runs = rle_string_counts(counts)
    if runs is None or runs.min() < 0 or runs.sum() != height * width:
        return "compressed RLE 'counts' is malformed or does not cover height*width pixels"
    return None


def _missing(entry: object, keys: tuple[str, ...]) -> list[str]:
    if not isinstance(entry, dict):
        return list(keys)
    return [k for k in keys if k not in entry]


ImageIndex = dict[int, dict[str, Any]]


def _image_problems(images: list[Any]) -> Generator[Problem, None, ImageIndex]:
    by_id: ImageIndex = {}
    for k, img in enumerate(images):
        if missing := _missing(img, _IMAGE_KEYS):
            yield Problem("missing_key", f"images[{k}] lacks required keys {missing}")
            continue
        image_id = img["id"]
        if not _is_int(image_id):
            yield Problem("bad_id", f"images[{k}] has a non-integer id {image_id!r}")
        elif image_id in by_id:
            yield Problem("duplicate_image_id", f"image id {image_id} appears twice", image_id)
        elif not all(_is_int(img[s]) and img[s] > 0 for s in ("height", "width")):
            yield Problem("bad_size", f"image id {image_id}: height/width must be positive ints",
                          image_id)
        elif img["height"] * img["width"] > MAX_MASK_PIXELS:
            yield Problem("bad_size", f"image id {image_id}: {img['height']}x{img['width']} "
                          f"(HxW) is more pixels than a COCO mask can hold (2**32 - 1)", image_id)
        elif problem := _file_name_problem(img["file_name"]):
            yield Problem("bad_file_name", f"image id {image_id}: {problem}", image_id)
        else:
            by_id[image_id] = img
    return by_id


def _file_name_problem(name: object) -> str | None:
    if not isinstance(name, str) or not name:
        return f"file_name must be a non-empty string, got {name!r}"
    # No file system can hold such a name: say so rather than fail on opening it.
    if "\x00" in name:
        return f"file_name {name!r} contains a NUL character"
    if any(len(part.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES
           for part in re.split(r"[\\/]", name)):
        return f"file_name {name[:40]!r}... has a component longer than {_MAX_NAME_BYTES} bytes"
    return None


def escapes_root(file_name: str) -> bool:
    """True for an absolute ``file_name`` (``/x``, ``C:\\x``) or one with a ``..`` part.

    Any ``..`` counts, even ``a/../b``: the OS resolves ``..`` after following a symbolic link,
    so ``link/../x`` may leave the root although it looks as if it stayed.
    """
    return bool(file_name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file_name)
                or ".." in re.split(r"[\\/]", file_name))


def _category_problems(categories: list[Any]) -> Generator[Problem, None, set[int]]:
    ids: set[int] = set()
    for k, cat in enumerate(categories):
        if missing := _missing(cat, _CATEGORY_KEYS):
            yield Problem("missing_key", f"categories[{k}] lacks required keys {missing}")
        elif not _is_int(cat["id"]):
            yield Problem("bad_id", f"categories[{k}] has a non-integer id {cat['id']!r}")
        elif cat["id"] in ids:
            yield Problem("duplicate_category_id", f"category id {cat['id']} appears twice")
        else:
            ids.add(cat["id"])
    return ids


def _bbox_problem(ann: dict[str, Any]) -> str | None:
    bbox = ann.get("bbox")
    if bbox is None:
        return None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
            and _finite_sum(bbox)):
        return f"bbox must be [x, y, width, height], finite numbers, got {bbox!r}"
    return None


def _annotation_problem(
    ann: dict[str, Any], images: ImageIndex, cat_ids: set[int]
) -> tuple[str, str] | None:
    """``(code, message)`` for the first defect of one annotation, or None."""
    if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
        return "bad_reference", f"refers to unknown image id {ann['image_id']!r}"
    if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
        return "bad_reference", f"refers to unknown category id {ann['category_id']!r}"
    if ann.get("iscrowd", 0) not in (0, 1):
        return "bad_annotation", f"iscrowd must be 0 or 1, got {ann['iscrowd']!r}"
    if "area" in ann and not (_is_number(ann["area"]) and _finite_sum([ann["area"]])
                              and ann["area"] >= 0):
        return "bad_annotation", f"area must be a finite number >= 0, got {ann['area']!r}"
    img = images[ann["image_id"]]
    problem = _bbox_problem(ann) or segmentation_problem(
        ann["segmentation"], img["height"], img["width"]
    )
    return ("bad_segmentation", problem) if problem else None


def _annotation_problems(
    annotations: list[Any], images: ImageIndex, cat_ids: set[int]
) -> Iterator[Problem]:
    seen: set[int] = set()
    for k, ann in enumerate(annotations):
        if missing := _missing(ann, _ANNOTATION_KEYS):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            yield Problem("missing_key", f"annotations[{k}] (id {ann_id}) lacks required keys "
                          f"{missing}", ann_id=ann_id if _is_int(ann_id) else None)
            continue
        ann_id = ann["id"]
        image_id = ann["image_id"] if _is_int(ann["image_id"]) else None
        where = f"annotation id {ann_id} (image id {ann['image_id']})"
        if not _is_int(ann_id):
            yield Problem("bad_id", f"annotations[{k}] has a non-integer id {ann_id!r}", image_id)
            continue
        if ann_id in seen:
            yield Problem("duplicate_annotation_id", f"annotation id {ann_id} appears twice",
                          image_id, ann_id)
        seen.add(ann_id)
        if problem := _annotation_problem(ann, images, cat_ids):
            yield Problem(problem[0], f"{where}: {problem[1]}", image_id, ann_id)


def iter_structure_problems(data: dict[str, Any]) -> Iterator[Problem]:
    """Yields every structural defect of a parsed COCO dict (keys, types, ids, references,
    polygon and RLE shapes). Anything yielded makes ``CocoDataset`` raise ``DatasetError``."""
    lists_ok = True
    for key in ("images", "categories", "annotations"):
        if key == "annotations" and key not in data:
            continue  # image-only JSONs (e.g. a test split) are valid
        if not isinstance(data.get(key), list):
            lists_ok = False
            yield Problem("missing_key", f"top-level '{key}' must be a list")
    if not lists_ok:
        return
    images = yield from _image_problems(data["images"])
    cat_ids = yield from _category_problems(data["categories"])
    yield from _annotation_problems(data.get("annotations", []), images, cat_ids)


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
    is empty are dropped (``maskrcnn data check`` reports them). With ``search_subfolders``, an
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
                    f"{self.image_root}; pass allow_outside_root=True if you trust this file"
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
        return {key: img[key] for key in _IMAGE_KEYS}

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, from the JSON (no image is read)."""
        return [img["width"] / img["height"] for img in self._images]

    def image_path(self, index: int) -> Path:
        """Where image ``index`` is read from (after the basename search, if enabled)."""
        file_name = self._images[index]["file_name"]
        path = self.image_root / file_name
        if self._basename_index is None or is_file(path):
            return path
        found = self._basename_index.get(Path(file_name).name, [])
        if len(found) > 1:
            raise DatasetError(
                f"{self.ann_file}: image id {self.image_ids[index]}: '{file_name}' is not at "
                f"{path} and its basename matches several files: {[str(p) for p in found]}"
            )
        return found[0] if found else path

    def _read(self, index: int) -> torch.Tensor:
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
        image = self._read(index)
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
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
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
