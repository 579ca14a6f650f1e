"""COCO JSON structure: parsing and validation of keys, types, ids, references, polygons, RLE.

``iter_structure_problems`` lists everything that makes ``CocoDataset`` refuse a file;
``maskrcnn data check`` reports the same list as errors.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeGuard

import numpy as np

from maskrcnn.data.errors import DatasetError

IMAGE_KEYS = ("id", "file_name", "height", "width")
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
    except RecursionError:
        raise DatasetError(f"{ann_file}: JSON nested too deeply to be a COCO file") from None
    except ValueError as e:  # e.g. an integer of thousands of digits
        raise DatasetError(f"{ann_file}: unreadable JSON value ({e})") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise DatasetError(f"{ann_file}: top level must be a JSON object, got {kind}")
    return data


def is_int(value: object) -> TypeGuard[int]:
    """An int, not a bool (JSON ``true`` is never an id or a size)."""
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
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        return "RLE 'size' must be [height, width]"
    if list(size) != [height, width]:
        return f"RLE size {size} differs from the image size [{height}, {width}]"
    if isinstance(counts, list):
        if not all(is_int(v) and v >= 0 for v in counts) or sum(counts) != height * width:
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


def _size_text(img: dict[str, Any]) -> str:
    """``height=40.0 (float), width=50``: the values as given, with the type of a bad one."""
    parts = []
    for key in ("height", "width"):
        value = img[key]
        ok = is_int(value) and value > 0
        parts.append(f"{key}={value!r}" + ("" if ok else f" ({type(value).__name__})"))
    return ", ".join(parts)


def _one_image_problem(k: int, img: Any, by_id: ImageIndex) -> Problem | None:
    if missing := _missing(img, IMAGE_KEYS):
        return Problem("missing_key", f"images[{k}] lacks required keys {missing}")
    image_id = img["id"]
    if not is_int(image_id):
        return Problem("bad_id", f"images[{k}] has a non-integer id {image_id!r}")
    if image_id in by_id:
        return Problem("duplicate_image_id", f"image id {image_id} appears twice", image_id)
    if not all(is_int(img[s]) and img[s] > 0 for s in ("height", "width")):
        return Problem("bad_size", f"image id {image_id}: height and width must be positive "
                       f"ints, got {_size_text(img)}", image_id)
    if img["height"] * img["width"] > MAX_MASK_PIXELS:
        return Problem("bad_size", f"image id {image_id}: {img['height']}x{img['width']} "
                       f"(HxW) is more pixels than a COCO mask can hold (2**32 - 1)", image_id)
    if problem := _file_name_problem(img["file_name"]):
        return Problem("bad_file_name", f"image id {image_id}: {problem}", image_id)
    return None


def _image_problems(
    images: list[Any], ann_counts: Counter[int]
) -> Generator[Problem, None, tuple[ImageIndex, set[int]]]:
    """Yields image defects; returns the valid images by id and the ids of rejected ones.

    The annotations of a rejected image are counted in its message instead of each being
    reported as a dangling reference.
    """
    by_id: ImageIndex = {}
    rejected: set[int] = set()
    for k, img in enumerate(images):
        problem = _one_image_problem(k, img, by_id)
        if problem is None:
            by_id[img["id"]] = img
            continue
        image_id = img.get("id") if isinstance(img, dict) else None
        if is_int(image_id) and image_id not in by_id and ann_counts[image_id]:
            rejected.add(image_id)
            count = ann_counts[image_id]
            problem = problem._replace(message=f"{problem.message}; its {count} "
                                       f"annotation{'s' if count > 1 else ''} not checked")
        yield problem
    return by_id, rejected


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


def posix_file_name(file_name: str) -> str:
    """``file_name`` with Windows separators turned into ``/``: ``imgs\\a.png`` -> ``imgs/a.png``.

    Datasets written on Windows use backslashes, which POSIX takes as part of a name.
    """
    return file_name.replace("\\", "/")


def escapes_root(file_name: str) -> bool:
    """True for an absolute ``file_name`` (``/x``, ``C:\\x``) or one with a ``..`` part.

    Any ``..`` counts, even ``a/../b``: the OS resolves ``..`` after following a symbolic link,
    so ``link/../x`` may leave the root although it looks as if it stayed.
    """
    name = posix_file_name(file_name)
    return bool(name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/"))


def _category_problems(categories: list[Any]) -> Generator[Problem, None, set[int]]:
    ids: set[int] = set()
    for k, cat in enumerate(categories):
        if missing := _missing(cat, _CATEGORY_KEYS):
            yield Problem("missing_key", f"categories[{k}] lacks required keys {missing}")
        elif not is_int(cat["id"]):
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
    if not is_int(ann["image_id"]) or ann["image_id"] not in images:
        return "bad_reference", f"refers to unknown image id {ann['image_id']!r}"
    if not is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
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
    annotations: list[Any], images: ImageIndex, rejected: set[int], cat_ids: set[int]
) -> Iterator[Problem]:
    seen: set[int] = set()
    for k, ann in enumerate(annotations):
        if missing := _missing(ann, _ANNOTATION_KEYS):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            yield Problem("missing_key", f"annotations[{k}] (id {ann_id}) lacks required keys "
                          f"{missing}", ann_id=ann_id if is_int(ann_id) else None)
            continue
        ann_id = ann["id"]
        image_id = ann["image_id"] if is_int(ann["image_id"]) else None
        where = f"annotation id {ann_id} (image id {ann['image_id']})"
        if not is_int(ann_id):
            yield Problem("bad_id", f"annotations[{k}] has a non-integer id {ann_id!r}", image_id)
            continue
        if ann_id in seen:
            yield Problem("duplicate_annotation_id", f"annotation id {ann_id} appears twice",
                          image_id, ann_id)
        seen.add(ann_id)
        if image_id in rejected:
            continue  # already counted in that image's problem
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
    annotations = data.get("annotations", [])
    ann_counts = Counter(a["image_id"] for a in annotations
                         if isinstance(a, dict) and is_int(a.get("image_id")))
    images, rejected = yield from _image_problems(data["images"], ann_counts)
    cat_ids = yield from _category_problems(data["categories"])
    yield from _annotation_problems(annotations, images, rejected, cat_ids)
