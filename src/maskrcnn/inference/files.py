"""Predicting image files for ``maskrcnn predict``: finding the images, reading them in
batches, recording COCO results and skipped files, writing predictions.json and overlays."""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor
from tqdm import tqdm

from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_input import to_float_image
from maskrcnn.data.image_io import read_image
from maskrcnn.data.polygons import mask_to_polygons
from maskrcnn.export.onnx_predictor import OnnxPredictor
from maskrcnn.inference.predictor import Prediction, Predictor
from maskrcnn.structures.local_masks import LocalMasks
from maskrcnn.utils.atomic import write_text_atomic
from maskrcnn.utils.visualize import draw_instances, save_overlay

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
# coco-rle: predictions.json with RLE masks; coco-polygon: with polygons; labelme: RLE, plus
# one LabelMe file per image in OUT/labelme (pre-labels that LabelMe opens).
FORMATS = ("coco-rle", "coco-polygon", "labelme")


class Skipped(NamedTuple):
    """An input that gave no prediction, and why."""

    file_name: str
    reason: str


def find_images(inputs: Sequence[str]) -> tuple[list[Path], list[Skipped]]:
    """Files named, image files under folders (recursively) and files matching glob patterns
    (``**`` allowed): sorted, without duplicates; and the inputs that matched nothing."""
    found: set[Path] = set()
    unmatched = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images = {
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            }
            if not images:
                kinds = " ".join(sorted(IMAGE_EXTENSIONS))
                unmatched.append(Skipped(item, f"the folder holds no image files ({kinds})"))
            found.update(images)
        elif path.is_file():
            found.add(path)
        else:
            matches = [Path(m) for m in glob.glob(item, recursive=True)]
            files = [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_EXTENSIONS]
            if not files:
                unmatched.append(Skipped(item, "no such file or folder, and no image matches it"))
            found.update(files)
    return sorted(found), unmatched


def overlay_names(files: Sequence[Path]) -> dict[Path, str]:
    """A distinct overlay name per file: ``<stem>.png``, or ``<stem>_<image id>.png`` where
    stems repeat, the number raised until the name is free (``a.jpg``, ``a.png`` and
    ``a_1.png`` would otherwise share ``a_1.png``). Names differing only in case count as
    the same: they are on case-insensitive file systems."""
    counts = Counter(p.stem.casefold() for p in files)
    names = {p: f"{p.stem}.png" for p in files if counts[p.stem.casefold()] == 1}
    used = {name.casefold() for name in names.values()}
    for image_id, p in enumerate(files, start=1):
        if p in names:
            continue
        number = image_id
        while f"{p.stem}_{number}.png".casefold() in used:
            number += 1
        names[p] = f"{p.stem}_{number}.png"
        used.add(names[p].casefold())
    return {p: names[p] for p in files}


class PredictionWriter:
    """Collects the COCO results of ``maskrcnn predict`` and writes overlays as it goes."""

    def __init__(
        self,
        predictor: Predictor | OnnxPredictor,
        out: Path,
        overlays: dict[Path, str] | None,
        fmt: str = "coco-rle",
        names: dict[Path, str] | None = None,
    ) -> None:
        """``overlays``: each file's overlay name (None: no overlays); ``fmt``: one of
        :data:`FORMATS`; ``names``: each file's distinct name stem (``overlay_names``), for
        the LabelMe files."""
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.predictor = predictor
        self.out = out
        self.overlays = overlays
        self.fmt = fmt
        self.names = names
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.seconds = 0.0

    def run(self, batch: list[tuple[int, Path, Tensor]], skipped: list[Skipped]) -> None:
        """Predicts a batch of (image id, path, (3, H, W) uint8 image) and records it. A batch
        that fails is retried image by image; an image that fails on its own goes to
        ``skipped`` with the reason, and the run goes on."""
        start = time.perf_counter()
        try:
            # Sliced prediction takes the uint8 image and converts tile by tile.
            tiled = getattr(self.predictor, "tile", None) is not None
            images = [b[2] if tiled else to_float_image(b[2]) for b in batch]
            predictions = self.predictor.predict_batch(images)
        except Exception as err:
            # One odd image, or a batch too big for the memory, must not cost the others
            # their results.
            if len(batch) > 1:
                for item in batch:
                    self.run([item], skipped)
            else:
                skip(skipped, batch[0][1], f"prediction failed ({type(err).__name__}: {err})")
            return
        self.seconds += time.perf_counter() - start
        for item, pred in zip(batch, predictions, strict=True):
            try:
                self.record(item, pred)
            except Exception as err:
                skip(skipped, item[1], f"writing its results failed ({type(err).__name__}: {err})")

    def record(self, item: tuple[int, Path, Tensor], pred: Prediction) -> None:
        """Adds the image and its results, and writes its overlay; nothing is added if any
        of it fails."""
        image_id, path, image = item
        height, width = pred.image_size
        results = pred.to_coco(image_id, self.predictor.label_to_cat_id)
        if self.fmt == "coco-polygon":
            for result, polygons in zip(results, instance_polygons(pred), strict=True):
                if polygons:  # an empty mask has no polygon: it keeps its (empty) RLE
                    result["segmentation"] = polygons
        if self.fmt == "labelme":
            stem = Path(self.names[path] if self.names else path.name).stem
            self.save_labelme(path, pred, self.out / "labelme" / f"{stem}.json")
        if self.overlays is not None:
            self.save_overlay(image, pred, self.out / "overlays" / self.overlays[path])
        self.images.append({"id": image_id, "file_name": str(path), "height": height,
                            "width": width})
        for result in results:
            self.annotations.append({"id": len(self.annotations) + 1, **result})

    def save_labelme(self, image_path: Path, pred: Prediction, path: Path) -> None:
        """A LabelMe file of ``pred``'s instances as polygons (one ``group_id`` per instance,
        so that one made of several parts converts back as one), ``imagePath`` relative to the
        file as LabelMe writes it: pre-labels to correct in LabelMe."""
        height, width = pred.image_size
        shapes = [
            {"label": name, "points": [[x, y] for x, y in zip(poly[::2], poly[1::2],
                                                              strict=True)],
             "group_id": k, "shape_type": "polygon", "flags": {}, "description": f"{score:.3f}"}
            for k, (name, polygons, score) in enumerate(
                zip(pred.class_names, instance_polygons(pred), pred.scores.tolist(), strict=True),
                start=1,
            )
            for poly in polygons
        ]
        record: dict[str, Any] = {
            "version": "5.4.1", "flags": {}, "shapes": shapes,
            "imagePath": os.path.relpath(image_path.resolve(), path.parent.resolve()),
            "imageData": None, "imageHeight": height, "imageWidth": width,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(record, indent=1))

    def save_overlay(self, image: Tensor, pred: Prediction, path: Path) -> None:
        names = self.predictor.class_names
        picture = draw_instances(image, pred.boxes, pred.labels, pred.scores, pred.masks, names)
        save_overlay(picture, path)

    def categories(self) -> list[dict[str, Any]]:
        names = self.predictor.class_names or []
        mapping = self.predictor.label_to_cat_id or {k: k for k in range(1, len(names))}
        return [{"id": cat, "name": self.predictor.name(label)} for label, cat in mapping.items()]

    def write(self, skipped: list[Skipped]) -> Path:
        """``OUT/predictions.json``, written atomically (a temporary file renamed over it)."""
        data = {
            "images": self.images,
            "categories": self.categories(),
            "annotations": self.annotations,
            "skipped": [s._asdict() for s in skipped],
        }
        return write_text_atomic(self.out / "predictions.json", json.dumps(data))


def instance_polygons(pred: Prediction) -> list[list[list[float]]]:
    """Each instance's outlines (see :func:`mask_to_polygons`), from dense or box-local
    masks alike."""
    if isinstance(pred.masks, LocalMasks):
        return [mask_to_polygons(crop.numpy(), origin) for crop, origin in pred.masks]
    return [mask_to_polygons(mask.numpy()) for mask in pred.masks]


def skip(skipped: list[Skipped], path: Path, reason: str) -> None:
    """Records ``path`` as skipped and says so on stderr, as it happens."""
    skipped.append(Skipped(str(path), reason))
    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)


def read_batches(
    files: Sequence[Path], batch_size: int, skipped: list[Skipped]
) -> Iterator[list[tuple[int, Path, Tensor]]]:
    """(image id, path, (3, H, W) uint8 image) of ``files``, ``batch_size`` at a time; the
    ids are 1-based positions in ``files``; unreadable files go to ``skipped``."""
    batch: list[tuple[int, Path, Tensor]] = []
    for image_id, path in enumerate(tqdm(files, desc="predict", unit="img"), start=1):
        try:
            batch.append((image_id, path, read_image(path)))
        except DatasetError as err:  # its message names the file
            skipped.append(Skipped(str(path), str(err)))
            tqdm.write(f"skipped {err}", file=sys.stderr)
        except Exception as err:  # a reader bug on one file must not end the run
            skip(skipped, path, f"cannot read it ({type(err).__name__}: {err})")
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def prepare_out(out: Path) -> str | None:
    """Creates the output folder ``out``; returns why it cannot be used, or None. Warns when
    it holds the results of an earlier run, which would mix with this run's."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder (created if missing)"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):  # writable? (permissions, a read-only mount)
            pass
    except OSError as err:
        return f"--out {out}: cannot write there ({err.strerror or err})"
    overlays = out / "overlays"
    old = sum(1 for _ in overlays.iterdir()) if overlays.is_dir() else 0
    if old:
        files = "file" if old == 1 else "files"
        print(f"warning: {overlays} already holds {old} {files} of an earlier run; those this "
              "run does not rewrite stay there (use a new --out to keep runs apart)",
              file=sys.stderr)
    elif (out / "predictions.json").exists():
        print(f"warning: replacing {out / 'predictions.json'} of an earlier run",
              file=sys.stderr)
    return None


def not_reached(
    files: Sequence[Path], writer: PredictionWriter, skipped: list[Skipped], err: BaseException
) -> list[Skipped]:
    """The files neither predicted nor skipped when the run stopped on ``err``."""
    done = {im["file_name"] for im in writer.images} | {s.file_name for s in skipped}
    reason = f"not predicted: the run stopped early ({type(err).__name__})"
    return [Skipped(str(p), reason) for p in files if str(p) not in done]


def predict_summary(writer: PredictionWriter, skipped: list[Skipped], json_path: Path) -> str:
    done = len(writer.images)
    per_image = writer.seconds / done if done else 0.0
    lines = [
        f"predicted {done} images, skipped {len(skipped)}, "
        f"{len(writer.annotations)} detections, {per_image:.3f} s per image",
        *(f"  skipped {s.file_name}: {s.reason}" for s in skipped),
        f"results: {json_path}",
    ]
    if writer.overlays is not None and done:
        lines.append(f"overlays: {writer.out / 'overlays'}")
    return "\n".join(lines)
