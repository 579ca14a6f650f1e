"""Converters to COCO JSON from LabelMe folders, YOLO segmentation labels and mask PNGs.

Every converter writes a COCO instance-segmentation JSON whose ``file_name`` entries are
relative to one image folder, records that folder (absolute) as ``info["image_root"]`` (pass
it as ``image_root`` / ``data.train_images``), and returns the path of the JSON it wrote.
Category ids start at 1. A missing input folder, or one without any input file, raises
``DatasetError`` naming it: an empty JSON would only fail later, far from the cause.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.coco_schema import posix_file_name
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_io import is_file, read_image_size, swapped_hint

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
_CIRCLE_POINTS = 32  # LabelMe circles become regular 32-gons
_NON_REGION_SHAPES = frozenset({"line", "linestrip", "point", "points"})


MAX_CLASSES = 100_000  # a class index beyond it is a corrupt line, not a class
# More distinct values in one instance-id mask is a photo or noise given as a mask.
MAX_MASK_INSTANCES = 1000


def _finite_polygon(values: list[float], where: str) -> list[float]:
    """``values`` as floats; NaN or infinite coordinates are a DatasetError naming ``where``
    (rasterising them loops or allocates without bound)."""
    try:
        polygon = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: coordinates must be numbers, got {values[:6]}") from None
    if not all(math.isfinite(v) for v in polygon):
        raise DatasetError(f"{where}: coordinates must be finite numbers, got {values[:6]}")
    return polygon


def _clip_polygon(polygon: list[float], height: int, width: int) -> list[float]:
    """Vertices moved inside the image (x in [0, width], y in [0, height]), as the loader
    does: a point far outside would make the rasteriser walk an edge millions of pixels long."""
    return [min(max(v, 0.0), float(width if k % 2 == 0 else height))
            for k, v in enumerate(polygon)]


def _polygon_annotation(polygons: list[list[float]], height: int, width: int) -> dict[str, Any]:
    """COCO fields for one instance made of polygons (flat ``[x1, y1, ...]``, pixels, finite),
    clipped to the image."""
    polygons = [_clip_polygon(p, height, width) for p in polygons]
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    x0, y0 = max(0.0, min(xs)), max(0.0, min(ys))
    x1, y1 = min(float(width), max(xs)), min(float(height), max(ys))
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    return {
        "segmentation": polygons,
        "area": float(mask_utils.area(rle)),
        "bbox": [x0, y0, max(0.0, x1 - x0), max(0.0, y1 - y0)],
        "iscrowd": 0,
    }


def _mask_annotation(mask: np.ndarray) -> dict[str, Any]:
    """COCO fields for one instance given as an ``(H, W)`` bool mask; stored as compressed RLE."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "segmentation": {"size": [int(v) for v in rle["size"]],
                         "counts": rle["counts"].decode("ascii")},
        "area": float(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def _write_coco(
    out_json: str | Path,
    image_root: Path,
    images: list[dict[str, Any]],
    instances: list[tuple[int, int, dict[str, Any]]],
    names: list[str],
) -> Path:
    """Writes images, ``(image_id, category_id, fields)`` instances and categories ``1..K``;
    ``info["image_root"]`` says what the file names are relative to."""
    annotations = [
        {"id": k, "image_id": image_id, "category_id": cat_id, **fields}
        for k, (image_id, cat_id, fields) in enumerate(instances, start=1)
    ]
    categories = [{"id": k, "name": n, "supercategory": ""} for k, n in enumerate(names, 1)]
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"description": "converted by maskrcnn", "image_root": str(image_root.absolute())}
    coco = {"info": info, "images": images, "annotations": annotations,
            "categories": categories}
    out.write_text(json.dumps(coco))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{path}: cannot read JSON ({e})") from e


def _labelme_polygon(shape: dict[str, Any], where: str) -> list[float] | None:
    """The flat polygon of one LabelMe shape, or None for shapes that enclose no region."""
    kind = shape.get("shape_type") or "polygon"
    points = shape.get("points")
    if kind in _NON_REGION_SHAPES:
        return None
    if not isinstance(points, list) or not all(len(p) == 2 for p in points):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y]")
    if not all(isinstance(p, (list, tuple)) for p in points):
        raise DatasetError(f"{where}: 'points' must be a list of [x, y]")
    flat = _finite_polygon([v for p in points for v in p], where)
    points = [flat[i : i + 2] for i in range(0, len(flat), 2)]
    if kind == "rectangle" and len(points) == 2:
        (xa, ya), (xb, yb) = points
        x0, x1, y0, y1 = min(xa, xb), max(xa, xb), min(ya, yb), max(ya, yb)
        return [x0, y0, x1, y0, x1, y1, x0, y1]
    if kind == "circle" and len(points) == 2:
        (cx, cy), (ex, ey) = points
        r = math.hypot(ex - cx, ey - cy)
        angles = [2 * math.pi * k / _CIRCLE_POINTS for k in range(_CIRCLE_POINTS)]
        return [v for a in angles for v in (cx + r * math.cos(a), cy + r * math.sin(a))]
    if kind == "polygon" and len(points) >= 3:
        return [float(v) for p in points for v in p]
    raise DatasetError(f"{where}: cannot convert a '{kind}' shape with {len(points)} points")


def _labelme_image_path(path: Path, record: dict[str, Any]) -> Path:
    """The image a LabelMe file describes, absolute and normalised.

    LabelMe stores ``imagePath`` relative to the JSON file (often ``../images/x.jpg``; with
    an output folder elsewhere, as many ``..`` as it takes), with backslashes when written on
    Windows. An absolute ``imagePath`` is not what LabelMe writes and could name any file on
    the machine: it is refused.
    """
    image_path = record.get("imagePath")
    if not isinstance(image_path, str) or not image_path:
        raise DatasetError(f"{path}: no 'imagePath'")
    posix = posix_file_name(image_path)
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise DatasetError(f"{path}: imagePath '{image_path}' is absolute; LabelMe writes it "
                           "relative to the JSON file (e.g. ../images/x.jpg)")
    resolved = Path(os.path.normpath(path.parent / posix))
    if not is_file(resolved):
        raise DatasetError(f"{path}: imagePath '{image_path}' points to {resolved}, which is "
                           "not a file (imagePath is relative to the LabelMe JSON)")
    return resolved


def _labelme_size(path: Path, record: dict[str, Any], image: Path) -> tuple[int, int]:
    """The image's (height, width), read from its file (which must be an image); a LabelMe
    ``imageHeight`` / ``imageWidth`` that disagrees is an error (its points would be placed
    on another image than the one described)."""
    size = read_image_size(image)
    height, width = record.get("imageHeight"), record.get("imageWidth")
    if not (isinstance(height, int) and isinstance(width, int)):
        return size
    stated = (height, width)
    if stated != size:
        raise DatasetError(
            f"{path}: imageHeight x imageWidth {stated[0]}x{stated[1]} differ from the image "
            f"{image.name}, {size[0]}x{size[1]} (HxW){swapped_hint(size, stated)}; fix the "
            "LabelMe file or the image"
        )
    return size


def _labelme_instances(path: Path, record: dict[str, Any]) -> dict[Any, tuple[str, list[Any]]]:
    """Groups a file's region shapes into instances: ``key -> (label, polygons)``.

    Shapes with the same label and ``group_id`` form one instance (LabelMe's convention for
    objects split in several parts); a shape without ``group_id`` is an instance of its own.
    """
    instances: dict[Any, tuple[str, list[Any]]] = {}
    skipped = 0
    for k, shape in enumerate(record["shapes"]):
        polygon = _labelme_polygon(shape, f"{path}: shape {k}")
        if polygon is None:
            skipped += 1
            continue
        label = str(shape.get("label", ""))
        group = shape.get("group_id")
        key = (label, group) if group is not None else k
        instances.setdefault(key, (label, []))[1].append(polygon)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} line/point shapes (no area)", stacklevel=3)
    return instances


def _common_root(paths: list[Path], what: str) -> Path:
    """The deepest folder holding every file of ``paths`` (absolute)."""
    try:
        return Path(os.path.commonpath([str(p.parent) for p in paths]))
    except ValueError as e:  # e.g. images on two Windows drives
        raise DatasetError(f"{what}: the images share no common folder ({e})") from e


def labelme_to_coco(folder: str | Path, out_json: str | Path) -> Path:
    """Converts a folder of LabelMe ``*.json`` files (not recursive) to one COCO JSON.

    Polygons, rectangles and circles (as 32-gons) become polygon instances; lines and points
    are skipped with a warning. Categories are the labels, sorted by name, ids ``1..K``.
    Each ``imagePath`` is resolved relative to its JSON file and must exist; ``file_name`` is
    relative to the deepest folder holding all images, written to ``info["image_root"]``.
    """
    folder = Path(folder).resolve()
    out = Path(out_json).resolve()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: LabelMe folder not found")
    files = sorted(p for p in folder.glob("*.json") if p.resolve() != out)
    if not files:
        raise DatasetError(f"{folder}: no LabelMe *.json files in this folder")
    records = []
    for path in files:
        record = _read_json(path)
        if not isinstance(record, dict) or not isinstance(record.get("shapes"), list):
            raise DatasetError(f"{path}: not a LabelMe file (no 'shapes' list)")
        insts = _labelme_instances(path, record)
        records.append((record, _labelme_image_path(path, record), insts))
    root = _common_root([image for _, image, _ in records], str(folder))
    if not root.is_relative_to(folder.parent):  # LabelMe's output folder was elsewhere
        warnings.warn(f"{folder}: the images lie outside {folder.parent}; file names are "
                      f"relative to {root}", stacklevel=2)
    names = sorted({label for _, _, insts in records for label, _ in insts.values()})
    cat_ids = {name: k for k, name in enumerate(names, start=1)}
    images, instances = [], []
    for image_id, (record, image, insts) in enumerate(records, start=1):
        height, width = _labelme_size(files[image_id - 1], record, image)
        images.append({"id": image_id, "file_name": image.relative_to(root).as_posix(),
                       "height": height, "width": width})
        for label, polygons in insts.values():
            fields = _polygon_annotation(polygons, height, width)
            instances.append((image_id, cat_ids[label], fields))
    return _write_coco(out_json, root, images, instances, names)


def _yolo_names(root: Path) -> list[str] | None:
    """Class names from ``root/data.yaml`` (``names:`` list or dict) or ``root/classes.txt``."""
    if (root / "data.yaml").is_file():
        try:
            names = yaml.safe_load((root / "data.yaml").read_text(encoding="utf-8"))["names"]
        except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
            raise DatasetError(f"{root / 'data.yaml'}: cannot read 'names' ({e})") from e
        if isinstance(names, dict):
            return [str(names[k]) for k in sorted(names)]
        if not isinstance(names, list):
            raise DatasetError(f"{root / 'data.yaml'}: 'names' must be a list or a mapping of "
                               f"class names, got {names!r}")
        return [str(n) for n in names]
    if (root / "classes.txt").is_file():
        lines = (root / "classes.txt").read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip()]
    return None


def _yolo_line(line: str, where: str, height: int, width: int) -> tuple[int, list[float]]:
    """``(class index, polygon in pixels)`` from one label line; a 4-number line is a box."""
    tokens = line.split()
    try:
        cls, coords = int(tokens[0]), [float(v) for v in tokens[1:]]
    except ValueError as e:
        raise DatasetError(f"{where}: not 'class x1 y1 x2 y2 ...' ({e})") from e
    if not 0 <= cls < MAX_CLASSES:
        raise DatasetError(f"{where}: class index {cls} is outside [0, {MAX_CLASSES})")
    coords = _finite_polygon(coords, where)
    if len(coords) == 4:  # detection-style line: cx cy w h
        cx, cy, w, h = coords
        coords = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2,
                  cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
    if len(coords) < 6 or len(coords) % 2:
        raise DatasetError(f"{where}: a polygon needs an even number (>= 6) of coordinates, "
                           f"got {len(coords)}")
    return cls, [v * (width if k % 2 == 0 else height) for k, v in enumerate(coords)]


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """The image files in ``folder``, sorted; DatasetError when the folder is missing or
    holds none."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    found = folder.rglob("*") if recursive else folder.glob("*")
    paths = sorted(p for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(f"{folder}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _check_yolo_labels(labels_dir: Path, used: set[Path]) -> None:
    """Raises when no label file pairs with an image; warns about the ones that do not.

    A label without an image is lost from the output, so it is never silent; a few strays
    (images deleted after labelling) are common, so only a layout where nothing pairs fails.
    """
    labels = sorted(labels_dir.rglob("*.txt"))
    if not labels:
        raise DatasetError(f"{labels_dir}: no *.txt label files")
    orphans = [p.relative_to(labels_dir).as_posix() for p in labels if p not in used]
    shown = ", ".join(orphans[:5]) + (", ..." if len(orphans) > 5 else "")
    if len(orphans) == len(labels):
        raise DatasetError(f"{labels_dir}: none of the {len(labels)} label files pairs with an "
                           f"image in {labels_dir.parent / 'images'} (labels/X/NAME.txt pairs "
                           f"with images/X/NAME.ext): {shown}")
    if orphans:
        warnings.warn(f"{labels_dir}: {len(orphans)} label files pair with no image and are "
                      f"ignored: {shown}", stacklevel=3)


def yolo_seg_to_coco(
    root: str | Path, out_json: str | Path, class_names: list[str] | None = None
) -> Path:
    """Converts an Ultralytics-style segmentation dataset to COCO JSON.

    ``root/images/**/NAME.ext`` pairs with ``root/labels/**/NAME.txt`` holding one instance a
    line: ``class x1 y1 x2 y2 ...`` normalised to [0, 1]. An image without a label file has no
    instances; a label file without an image is reported with a warning (an error when no
    label file pairs with any image). Names come from ``class_names``, else
    ``root/data.yaml``, else ``root/classes.txt``, else ``class_<i>``. YOLO class ``i``
    becomes COCO category ``i + 1``. ``file_name`` is relative to ``root/images``.
    """
    root = Path(root)
    images_dir, labels_dir = root / "images", root / "labels"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: no images folder")
    if not labels_dir.is_dir():
        raise DatasetError(f"{labels_dir}: no labels folder (YOLO-seg needs ROOT/images and "
                           "ROOT/labels)")
    names = class_names if class_names is not None else _yolo_names(root)
    paths = _image_files(images_dir, recursive=True)
    label_files = {p: (labels_dir / p.relative_to(images_dir)).with_suffix(".txt")
                   for p in paths}
    _check_yolo_labels(labels_dir, {f for f in label_files.values() if f.is_file()})
    images, instances = [], []
    for image_id, path in enumerate(paths, start=1):
        height, width = read_image_size(path)
        images.append({"id": image_id, "file_name": path.relative_to(images_dir).as_posix(),
                       "height": height, "width": width})
        label_file = label_files[path]
        lines = label_file.read_text().splitlines() if label_file.is_file() else []
        for n, line in enumerate(lines, start=1):
            if line.strip():
                cls, polygon = _yolo_line(line, f"{label_file}:{n}", height, width)
                if names is not None and cls >= len(names):
                    raise DatasetError(f"{label_file}:{n}: class {cls} but only "
                                       f"{len(names)} names")
                instances.append((image_id, cls + 1, _polygon_annotation([polygon], height,
                                                                          width)))
    if names is None:
        names = [f"class_{i}" for i in range(max((c for _, c, _ in instances), default=0))]
    return _write_coco(out_json, images_dir, images, instances, list(names))


def _read_instance_ids(path: Path) -> np.ndarray:
    """An instance-id PNG as an ``(H, W)`` int array; colour PNGs get one id per colour."""
    try:
        with Image.open(path) as img:
            # Palette images keep their indices: converting would turn ids into colours.
            array = np.array(img.convert("RGB") if img.mode in ("RGBA", "LA") else img)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read mask ({e})") from e
    if array.ndim == 3:
        rgb = array[..., :3].astype(np.int64)
        return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    return array.astype(np.int64)


def mask_pngs_to_coco(
    images_dir: str | Path,
    masks_dir: str | Path,
    out_json: str | Path,
    category_name: str = "object",
) -> Path:
    """Converts per-image instance masks (Penn-Fudan ``PedMasks`` style) to COCO JSON.

    Each image ``NAME.ext`` in ``images_dir`` pairs with ``masks_dir/NAME.png`` or
    ``masks_dir/NAME_mask.png``, same size, where 0 is background and every other value is
    one instance (all of category ``category_name``, id 1), stored as compressed RLE.
    ``file_name`` is relative to ``images_dir``.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    paths = _image_files(images_dir, recursive=False)
    if not masks_dir.is_dir():
        raise DatasetError(f"{masks_dir}: mask folder not found")
    if masks_dir.resolve() == images_dir.resolve():
        raise DatasetError(f"{masks_dir}: the masks folder is the images folder; give the "
                           "folder of instance-id masks")
    masks = {p.stem: p for p in masks_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
    images, instances = [], []
    for image_id, path in enumerate(paths, start=1):
        mask_path = masks.get(path.stem) or masks.get(f"{path.stem}_mask")
        if mask_path is None:
            raise DatasetError(f"{path}: no mask {path.stem}.png or {path.stem}_mask.png "
                               f"in {masks_dir}")
        height, width = read_image_size(path)
        ids = _read_instance_ids(mask_path)
        if ids.shape != (height, width):
            raise DatasetError(f"{mask_path}: mask is {ids.shape[0]}x{ids.shape[1]} (HxW) but "
                               f"the image {path.name} is {height}x{width}")
        values = np.unique(ids)
        if len(values) > MAX_MASK_INSTANCES:
            raise DatasetError(
                f"{mask_path}: {len(values) - 1} distinct non-zero values, each of which would "
                f"be an instance (at most {MAX_MASK_INSTANCES} are accepted): this looks like "
                "a photo or noise, not an instance-id mask (0 background, one value per "
                "instance, saved as PNG)"
            )
        images.append({"id": image_id, "file_name": path.name, "height": height, "width": width})
        for value in values:
            if value != 0:
                instances.append((image_id, 1, _mask_annotation(ids == value)))
    return _write_coco(out_json, images_dir, images, instances, [category_name])
