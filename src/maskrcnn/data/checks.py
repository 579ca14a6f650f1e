"""``check_dataset``: every problem of a COCO dataset at once, as a report a user can act on."""

from __future__ import annotations

import os
import posixpath
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pycocotools import mask as mask_utils
from tqdm import tqdm

from maskrcnn.data.coco import build_label_map, segmentation_to_rle
from maskrcnn.data.coco_schema import (
    escapes_root,
    is_int,
    iter_structure_problems,
    load_coco_json,
    posix_file_name,
)
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_io import (
    MAX_IMAGE_PIXELS,
    decode_notes,
    index_by_basename,
    is_file,
    read_image_size,
    swapped_hint,
    too_large,
)

Severity = Literal["error", "warning"]
# Annotation tools round coordinates, so a polygon or box may overshoot the border a little.
_BORDER_TOLERANCE = 1.0
# Below this IoU between the bbox and the mask's extent, the two describe different objects.
_MIN_BOX_MASK_IOU = 0.5


@dataclass(frozen=True)
class Finding:
    """One problem: ``severity`` error (loading or evaluation would fail or be wrong) or
    warning (works, but the data is probably not what was meant)."""

    severity: Severity
    code: str
    message: str
    image_id: int | None = None
    ann_id: int | None = None
    file: str | None = None


@dataclass(frozen=True)
class ClassCount:
    """How often one category occurs: annotations and distinct images.

    ``label`` and ``name`` are what ``CocoDataset`` uses (``label_to_cat_id``, ``class_names``).
    """

    label: int
    cat_id: int
    name: str
    instances: int
    images: int


@dataclass
class CheckReport:
    """The result of ``check_dataset``: findings plus dataset statistics."""

    ann_file: Path
    image_root: Path
    findings: list[Finding] = field(default_factory=list)
    num_images: int = 0
    num_annotations: int = 0
    num_empty_images: int = 0
    class_counts: list[ClassCount] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when there is no error (warnings allowed)."""
        return not self.errors

    def summary_table(self, examples: int = 2) -> str:
        """A plain-text report: totals, findings grouped by code with a few examples each,
        per-class counts and a one-line verdict."""
        lines = [
            f"annotations: {self.ann_file}",
            f"image root:  {self.image_root}",
            f"{self.num_images} images ({self.num_empty_images} without annotations), "
            f"{self.num_annotations} annotations, {len(self.class_counts)} categories",
            "",
        ]
        groups = Counter((f.severity, f.code) for f in self.findings)
        if groups:
            lines.append(f"{'severity':<9} {'code':<26} {'count':>6}  first examples")
        for (severity, code), count in sorted(groups.items()):
            shown = [f for f in self.findings if f.code == code][:examples]
            lines.append(f"{severity:<9} {code:<26} {count:>6}  {shown[0].message}")
            lines.extend(f"{'':<45}{f.message}" for f in shown[1:])
        header = f"{'label':>5} {'cat id':>6}  {'class name':<32} {'instances':>9} {'images':>6}"
        lines += ["", header]
        lines += [
            f"{c.label:>5} {c.cat_id:>6}  {c.name:<32} {c.instances:>9} {c.images:>6}"
            for c in self.class_counts
        ]
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"\n{verdict}: {len(self.errors)} errors, {len(self.warnings)} warnings")
        return "\n".join(lines)


def _entries(data: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The dict entries of ``data[key]``; none when it is not a list (an error elsewhere)."""
    value = data.get(key)
    return [e for e in value if isinstance(e, dict)] if isinstance(value, list) else []


def _int_values(entries: list[dict[str, Any]], key: str) -> list[int]:
    return [e[key] for e in entries if is_int(e.get(key))]


def _valid_categories(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Categories with an int id and a name, first of each id: what the label map is built
    from, even when other parts of the JSON are broken."""
    by_id: dict[int, dict[str, Any]] = {}
    for cat in _entries(data, "categories"):
        if "name" in cat and is_int(cat.get("id")):
            by_id.setdefault(cat["id"], cat)
    return list(by_id.values())


def _category_findings(data: dict[str, Any]) -> Iterator[Finding]:
    categories = _valid_categories(data)
    by_name: dict[str, list[int]] = {}
    for cat in categories:
        by_name.setdefault(str(cat["name"]), []).append(cat["id"])
    for name, ids in by_name.items():
        if len(ids) > 1:
            suffixed = ", ".join(f"'{name}#{i}'" for i in sorted(ids))
            yield Finding("warning", "duplicate_category_name",
                          f"category ids {sorted(ids)} are all named '{name}'; "
                          f"their labels are named {suffixed}")
    used = set(_int_values(_entries(data, "annotations"), "category_id"))
    for cat in categories:
        if cat["id"] not in used:
            yield Finding("warning", "unused_category",
                          f"category id {cat['id']} '{cat['name']}' has no annotations")


def _missing_image_finding(img: dict[str, Any], root: Path, found: list[Path]) -> Finding:
    if len(found) == 1:
        message = (f"image id {img['id']}: '{img['file_name']}' not found; found at "
                   f"{found[0].relative_to(root)}; use search_subfolders=True "
                   "(CLI: --search-subfolders)")
    elif found:
        where = ", ".join(str(p.relative_to(root)) for p in found[:3])
        message = (f"image id {img['id']}: '{img['file_name']}' not found; several files share "
                   f"its basename ({where}); fix file_name")
    else:
        message = f"image id {img['id']}: '{img['file_name']}' not found under {root}"
    return Finding("error", "missing_image", message, img["id"], file=img["file_name"])


def _file_findings(
    img: dict[str, Any], path: Path, max_pixels: int | None, decode: bool
) -> list[Finding]:
    """The problems of one image file: unreadable header, too many pixels, a size other than
    the JSON's; with ``decode``, pixel data that does not decode, and notes on how it is read."""
    where = {"image_id": img["id"], "file": img["file_name"]}
    try:
        height, width = read_image_size(path)
    except DatasetError as e:
        return [Finding("error", "unreadable_image", f"image id {img['id']}: {e}", **where)]
    problem = too_large(width, height, max_pixels)
    if problem is not None:
        return [Finding("error", "image_too_large", f"image id {img['id']}: {problem}", **where)]
    findings = []
    if (height, width) != (img["height"], img["width"]):
        findings.append(Finding(
            "error", "size_mismatch",
            f"image id {img['id']}: file is {height}x{width} (HxW, after EXIF rotation) but the "
            f"JSON says {img['height']}x{img['width']}"
            f"{swapped_hint((height, width), (img['height'], img['width']))}", **where))
    if decode:
        try:
            notes = decode_notes(path)
        except DatasetError as e:
            return [*findings, Finding("error", "corrupt_image", f"image id {img['id']}: {e}",
                                       **where)]
        findings += [Finding("warning", "image_mode", f"image id {img['id']}: {path.name}: "
                             f"{note}", **where) for note in notes]
    return findings


def _outside_root_finding(img: dict[str, Any], allowed: bool) -> Finding:
    where = (f"image id {img['id']}: file_name '{img['file_name']}' is absolute or leaves the "
             "image root")
    if allowed:
        return Finding("warning", "path_outside_root", f"{where}; the dataset will not be "
                       "relocatable", img["id"], file=img["file_name"])
    return Finding("error", "path_outside_root", f"{where}; CocoDataset refuses it unless "
                   "allow_outside_root=True (config: data.allow_outside_root=true, "
                   "check: --allow-outside-root)", img["id"], file=img["file_name"])


def _duplicate_file_findings(images: list[dict[str, Any]]) -> Iterator[Finding]:
    """One error per image id whose file another image id already names: the picture would
    be trained on twice, and scored twice against two halves of its annotations."""
    first: dict[str, int] = {}
    for img in images:
        name = posixpath.normpath(posix_file_name(img["file_name"]))
        if name in first:
            yield Finding("error", "duplicate_file",
                          f"image id {img['id']}: '{img['file_name']}' is also image id "
                          f"{first[name]}; give each file one image id (merge their "
                          "annotations)", img["id"], file=img["file_name"])
        else:
            first[name] = img["id"]


def _image_findings(
    images: list[dict[str, Any]], root: Path, search_subfolders: bool, allow_outside_root: bool,
    max_pixels: int | None, decode: bool, show_progress: bool,
) -> Iterator[Finding]:
    for img in images:
        if escapes_root(img["file_name"]):
            yield _outside_root_finding(img, allow_outside_root)
    yield from _duplicate_file_findings(images)
    index: dict[str, list[Path]] | None = None
    readable: list[tuple[dict[str, Any], Path]] = []
    for img in images:
        path = root / posix_file_name(img["file_name"])
        if not is_file(path) and os.path.lexists(path):
            yield Finding("error", "not_a_file",
                          f"image id {img['id']}: '{img['file_name']}' is not a regular file (a "
                          "folder, a pipe, a device or a broken link)", img["id"],
                          file=img["file_name"])
            continue
        if not is_file(path):
            # Walked at most once, and only when some image is missing.
            index = index if index is not None else index_by_basename(root)
            found = index.get(path.name, [])
            if not (search_subfolders and len(found) == 1):
                yield _missing_image_finding(img, root, found)
                continue
            path = found[0]
        readable.append((img, path))
    # Header reads are I/O-bound, and PIL releases the GIL while it decodes: threads overlap
    # both, on every core.
    workers = max(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(
            lambda item: _file_findings(item[0], item[1], max_pixels, decode), readable
        )
        what = "decode" if decode else "headers"
        for findings in tqdm(results, total=len(readable), desc=f"check {what}", unit="img",
                             disable=not show_progress):
            yield from findings


def _box_findings(ann: dict[str, Any], height: int, width: int) -> Iterator[Finding]:
    x, y, w, h = ann["bbox"]
    ids = f"annotation id {ann['id']} (image id {ann['image_id']})"
    if w <= 0 or h <= 0:
        yield Finding("warning", "degenerate_box", f"{ids}: bbox {ann['bbox']} has no area; "
                      "the dataset drops this instance", ann["image_id"], ann["id"])
    elif x >= width or y >= height or x + w <= 0 or y + h <= 0:
        yield Finding("warning", "box_outside_image", f"{ids}: bbox {ann['bbox']} lies outside "
                      f"the {width}x{height} (WxH) image; the dataset drops this instance",
                      ann["image_id"], ann["id"])
    elif x < -_BORDER_TOLERANCE or y < -_BORDER_TOLERANCE or (
        x + w > width + _BORDER_TOLERANCE or y + h > height + _BORDER_TOLERANCE
    ):
        yield Finding("warning", "box_outside_image", f"{ids}: bbox {ann['bbox']} extends "
                      f"beyond the {width}x{height} (WxH) image", ann["image_id"], ann["id"])


def _polygon_findings(ann: dict[str, Any], height: int, width: int) -> Iterator[Finding]:
    ids = f"annotation id {ann['id']} (image id {ann['image_id']})"
    for k, part in enumerate(ann["segmentation"]):
        xs, ys = part[0::2], part[1::2]
        # Shoelace formula: twice the signed area.
        doubled = sum(xs[i - 1] * ys[i] - xs[i] * ys[i - 1] for i in range(len(xs)))
        if abs(doubled) < 1e-6:
            yield Finding("warning", "degenerate_polygon", f"{ids}: polygon {k} has zero area",
                          ann["image_id"], ann["id"])
        if min(xs) < -_BORDER_TOLERANCE or min(ys) < -_BORDER_TOLERANCE or (
            max(xs) > width + _BORDER_TOLERANCE or max(ys) > height + _BORDER_TOLERANCE
        ):
            yield Finding("warning", "polygon_outside_image", f"{ids}: polygon {k} has points "
                          f"outside the {width}x{height} (WxH) image", ann["image_id"], ann["id"])


def _iou_xywh(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    union = a[2] * a[3] + b[2] * b[3] - ix * iy
    return ix * iy / union if union > 0 else 0.0


def _mask_findings(ann: dict[str, Any], height: int, width: int) -> Iterator[Finding]:
    ids = f"annotation id {ann['id']} (image id {ann['image_id']})"
    rle = segmentation_to_rle(ann["segmentation"], height, width)
    if mask_utils.area(rle) == 0:
        yield Finding("warning", "empty_mask", f"{ids}: the mask covers no pixel; the dataset "
                      "drops this instance", ann["image_id"], ann["id"])
        return
    bbox = ann.get("bbox")
    if bbox and bbox[2] > 0 and bbox[3] > 0:
        iou = _iou_xywh(bbox, [float(v) for v in mask_utils.toBbox(rle)])
        if iou < _MIN_BOX_MASK_IOU:
            yield Finding("warning", "bbox_mask_mismatch", f"{ids}: bbox {bbox} and the mask's "
                          f"extent overlap with IoU {iou:.2f}", ann["image_id"], ann["id"])


def _annotation_findings(data: dict[str, Any]) -> Iterator[Finding]:
    images = {img["id"]: img for img in data["images"]}
    for ann in data.get("annotations", []):
        img = images[ann["image_id"]]
        height, width = img["height"], img["width"]
        if ann.get("bbox") is not None:
            yield from _box_findings(ann, height, width)
        if isinstance(ann["segmentation"], list):
            yield from _polygon_findings(ann, height, width)
        yield from _mask_findings(ann, height, width)


def _class_counts(data: dict[str, Any]) -> list[ClassCount]:
    """Per-category counts from the raw JSON, rejected annotations included: they are in the
    file, and a fix makes them count."""
    annotations = _entries(data, "annotations")
    instances = Counter(_int_values(annotations, "category_id"))
    image_sets: dict[int, set[int]] = {}
    for ann in annotations:
        cat_id, image_id = ann.get("category_id"), ann.get("image_id")
        if is_int(cat_id) and is_int(image_id):
            image_sets.setdefault(cat_id, set()).add(image_id)
    label_to_cat_id, class_names = build_label_map(_valid_categories(data))
    return [
        ClassCount(label, cat_id, class_names[label], instances[cat_id],
                   len(image_sets.get(cat_id, ())))
        for label, cat_id in label_to_cat_id.items()
    ]


def _statistics(report: CheckReport, data: dict[str, Any]) -> None:
    """Totals and per-class counts, from the raw JSON so they hold for a broken file too."""
    images, annotations = data.get("images"), data.get("annotations")
    report.num_images = len(images) if isinstance(images, list) else 0
    report.num_annotations = len(annotations) if isinstance(annotations, list) else 0
    annotated = set(_int_values(_entries(data, "annotations"), "image_id"))
    report.num_empty_images = sum(
        1 for img in _entries(data, "images")
        if not (is_int(img.get("id")) and img["id"] in annotated)  # an id may be unhashable
    )
    report.class_counts = _class_counts(data)


def check_dataset(
    ann_file: str | Path,
    image_root: str | Path | None = None,
    search_subfolders: bool = False,
    allow_outside_root: bool = False,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    decode: bool = True,
    show_progress: bool = False,
) -> CheckReport:
    """Checks a COCO instance-segmentation dataset, decoding every image (``decode=False``:
    headers only, which misses truncated or corrupt pixel data).

    ``image_root`` defaults to the JSON's folder. Structural problems (what makes
    ``CocoDataset`` refuse to load) come first; the image and geometry checks run only when
    the structure is sound. With ``search_subfolders``, images found by basename elsewhere
    under the root (as ``CocoDataset(search_subfolders=True)`` finds them) are not errors.
    A ``file_name`` that is absolute or has a ``..`` part is an error, as ``CocoDataset``
    refuses it, unless ``allow_outside_root`` (then a warning). An image of more than
    ``max_image_pixels`` pixels (the loader's limit) is an error. Counts and class statistics
    come from the raw JSON, whatever its defects.
    """
    ann_file = Path(ann_file)
    root = Path(image_root) if image_root is not None else ann_file.parent
    report = CheckReport(ann_file, root)
    try:
        data = load_coco_json(ann_file)
    except DatasetError as e:
        report.findings.append(Finding("error", "invalid_json", str(e), file=str(ann_file)))
        return report
    _statistics(report, data)
    problems = list(iter_structure_problems(data))
    report.findings += [
        Finding("error", p.code, p.message, p.image_id, p.ann_id) for p in problems
    ]
    report.findings += _category_findings(data)
    # A defect not tied to one annotation (top level, images, categories) leaves nothing to
    # check safely; a defective annotation is only left out of the later checks.
    if any(p.ann_id is None for p in problems):
        return report
    bad = {p.ann_id for p in problems}
    data = {**data, "annotations": [a for a in data.get("annotations", [])
                                    if a["id"] not in bad]}
    report.findings += _image_findings(data["images"], root, search_subfolders,
                                       allow_outside_root, max_image_pixels, decode,
                                       show_progress)
    report.findings += _annotation_findings(data)
    return report
