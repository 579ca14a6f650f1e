"""Large images: the whole-image pass against sliced prediction, on a mosaic with known
ground truth.

The validation images of a COCO set (by default the demo's synthetic shapes, which the demo
model was trained on at 256 px) are laid out on one canvas of ``--side`` pixels, every
``--stride`` pixels, so that objects fall across tile borders and corners. Each variant runs
in its own process (so that its peak memory is its own) and is scored with pycocotools,
each mosaic cell an image of its own (a prediction belongs to the cell holding its box's
centre; one 20,000 px image with 15,000 objects is beyond pycocotools' per-image matching),
with up to ``--max-dets`` detections on the canvas (5,000 by default):

- ``whole``: the image resized to the model's input size (what a plain predictor does; its
  masks pasted over their boxes, as the whole-image pass of sliced prediction does: the
  plain predictor's 100 image-sized masks need 3.6 GB as bool at 6,000 px, and its float
  paste ran this 24 GB machine out of memory);
- ``cells``: each mosaic cell predicted on its own, as the model was trained (the reference:
  no object is cut, so its duplicates and pieces are the model's own);
- ``tiles``: the tiles' detections as they come (sliced prediction without the merge);
- ``sliced``: sliced prediction, objects merged across tiles;
- ``sliced_full``: the same with the whole-image pass (``--full-pass``).

Printed per variant: mask and box AP, AR and AR of small objects, ground-truth objects
matched by more than one prediction of their class (mask IoU >= 0.5, score >= 0.5),
predictions that are a piece of an object (IoU < 0.5 with every object but 80 % inside
one), objects split at a tile border (found twice or with a piece, where one of those
predictions was made from detections whose boxes touched their tile's inner edge; the
others come from detections inside their tiles, like the model's own duplicates and pieces
on the cells), seconds and peak resident memory.

    python benchmarks/large_image.py --checkpoint runs/demo/best.pth \\
        --val-json runs/demo/data/val.json --side 6000 --tile 256
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import platform
import resource
import subprocess
import sys
import time
import unittest.mock
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.engine.coco_results import prediction_to_coco
from maskrcnn.inference import sliced as sliced_module
from maskrcnn.inference.predictor import Predictor
from maskrcnn.inference.sliced import (
    Candidates,
    TileConfig,
    collect,
    model_full_pass,
    model_tile_predictor,
)
from maskrcnn.model.preprocess import Preprocessor
from maskrcnn.structures.detections import Detections
from maskrcnn.structures.local_masks import LocalMasks, crop_to_rle

VARIANTS = ("whole", "cells", "tiles", "sliced", "sliced_full")
MAX_DETS = 5000


def mosaic(
    val_json: Path, images: Path, side: int, stride: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The canvas (3, side, side) uint8 and its COCO ground truth: one image per mosaic
    cell (ids 1, 2, ... row by row, see :func:`cell_of`), each of the canvas's size."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(val_json))
    ids = sorted(coco.getImgIds())
    canvas = torch.zeros((3, side, side), dtype=torch.uint8)
    annotations: list[dict[str, Any]] = []
    k = 0
    for y in range(0, side, stride):
        for x in range(0, side, stride):
            info = coco.loadImgs(ids[k % len(ids)])[0]
            k += 1
            picture = np.array(Image.open(images / info["file_name"]).convert("RGB"))
            h, w = min(picture.shape[0], side - y), min(picture.shape[1], side - x)
            canvas[:, y : y + h, x : x + w] = torch.from_numpy(picture[:h, :w]).permute(2, 0, 1)
            for ann in coco.loadAnns(coco.getAnnIds(imgIds=info["id"], iscrowd=None)):
                mask = torch.from_numpy(coco.annToMask(ann)[:h, :w].astype(bool))
                if not mask.any():
                    continue
                rle = crop_to_rle(mask, (x, y), (side, side))
                bbox = [float(v) for v in mask_utils.toBbox(rle)]
                annotations.append({"id": len(annotations) + 1, "image_id": k,
                                    "category_id": ann["category_id"], "segmentation": rle,
                                    "area": float(mask.sum()), "bbox": bbox,
                                    "iscrowd": ann.get("iscrowd", 0)})
    truth = {"images": [{"id": i, "width": side, "height": side, "file_name": f"cell {i}"}
                        for i in range(1, k + 1)],
             "categories": coco.loadCats(coco.getCatIds()), "annotations": annotations}
    return canvas, truth


def cell_of(bbox: list[float], side: int, stride: int) -> int:
    """The mosaic cell (image id) holding the centre of xywh ``bbox``."""
    columns = len(range(0, side, stride))
    col = min(int((bbox[0] + bbox[2] / 2) // stride), columns - 1)
    row = min(int((bbox[1] + bbox[3] / 2) // stride), columns - 1)
    return row * columns + col + 1


def scores(
    truth: dict[str, Any], results: list[dict[str, Any]], max_dets: int = MAX_DETS
) -> dict[str, float]:
    """COCO AP / AR (``max_dets`` detections), and the duplicate, piece and split counts
    (a result with ``"from_cut": True`` was made from detections their tiles cut)."""
    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        for iou_type in ("segm", "bbox"):
            dt = gt.loadRes(results) if results else COCO()
            ev = COCOeval(gt, dt, iou_type)
            ev.params.maxDets = [10, 100, max_dets]
            if results:
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
                stats = ev.stats
                # AP at max_dets (stats[0] is AP at 100 detections an image).
                precision = ev.eval["precision"][:, :, :, 0, -1]
                ap = float(precision[precision > -1].mean())
            else:
                stats, ap = np.zeros(12), 0.0
            key = "mask" if iou_type == "segm" else "box"
            out[f"{key}_ap"] = ap
            out[f"{key}_ar"] = float(stats[8])
            out[f"{key}_ar_small"] = float(stats[9])
    confident = [r for r in results if r["score"] >= 0.5]
    out["duplicated_objects"] = out["pieces"] = out["split_objects"] = 0
    for image in truth["images"]:
        problems = image_problems(
            [r for r in confident if r["image_id"] == image["id"]],
            [a for a in truth["annotations"] if a["image_id"] == image["id"]])
        for key, value in problems.items():
            out[key] += value
    out["confident"] = len(confident)
    out["objects"] = len(truth["annotations"])
    return out


def image_problems(results: list[dict[str, Any]], objects: list[dict[str, Any]]
                   ) -> dict[str, int]:
    """One image's objects found twice or more, pieces and objects split at a tile border
    (see the module's docstring), from its confident ``results``."""
    if not results or not objects:
        return {"duplicated_objects": 0, "pieces": 0, "split_objects": 0}
    segs = [r["segmentation"] for r in results]
    truths = [a["segmentation"] for a in objects]
    iou = mask_utils.iou(segs, truths, [0] * len(truths))  # (P, G)
    same = (np.array([r["category_id"] for r in results])[:, None]
            == np.array([a["category_id"] for a in objects])[None, :])
    # A piece: below 0.5 with every object, but mostly inside one (its area inside).
    inside = np.array([mask_utils.area(mask_utils.merge([p, truths[j]], intersect=True))
                       for p, j in zip(segs, iou.argmax(1), strict=True)], dtype=np.float64)
    area = np.array([mask_utils.area(p) for p in segs], dtype=np.float64)
    hit = (iou >= 0.5) & same
    duplicated = hit.sum(0) > 1
    piece = (iou.max(1) < 0.5) & (inside >= 0.8 * area)
    # Per object, the predictions that make it a problem: its matches when it is found
    # twice, and its pieces; split when one of them was made from cut detections.
    split = set()
    for p, r in enumerate(results):
        if r.get("from_cut"):
            split.update(([int(iou[p].argmax())] if piece[p] else [])
                         + [int(g) for g in np.where(hit[p] & duplicated)[0]])
    return {"duplicated_objects": int(duplicated.sum()), "pieces": int(piece.sum()),
            "split_objects": len(split)}


def mark_from_cut(results: list[dict[str, Any]], c: Candidates,
                  label_to_cat: Mapping[int, int] | None) -> None:
    """Sets ``from_cut`` on each result: True unless it is a detection whose box was away
    from its tile's inner edges (the merge gives a group with such a member that member's
    box and score; a group of cut pieces gets their united box). Matched by class, top-left
    corner and score, which the predictor passes on unchanged."""
    def cat(label: int) -> int:
        return label if label_to_cat is None else label_to_cat[label]

    uncut = {(cat(int(label)), float(box[0]), float(box[1]), float(score))
             for box, score, label, cut in zip(c.dets.boxes, c.dets.scores, c.dets.labels,
                                               c.cut, strict=True) if not cut}
    for r in results:
        key = (r["category_id"], r["bbox"][0], r["bbox"][1], r["score"])
        r["from_cut"] = key not in uncut


def to_results(predictor: Predictor, dets: Detections, masks: LocalMasks,
               limit: int) -> list[dict[str, Any]]:
    """COCO results of the best detections scoring 0.05 or more (at most ``limit``)."""
    keep = torch.where(dets.scores >= 0.05)[0]
    keep = keep[dets.scores[keep].argsort(descending=True, stable=True)][:limit]
    kept = {"boxes": dets.boxes[keep], "labels": dets.labels[keep],
            "scores": dets.scores[keep], "masks": masks.select(keep)}
    return prediction_to_coco(kept, 1, predictor.label_to_cat_id)


def _recording(collect_fn: Callable[..., Candidates], into: list[Candidates], *args: Any,
               **kwargs: Any) -> Candidates:
    into.append(collect_fn(*args, **kwargs))
    return into[-1]


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    canvas, truth = mosaic(args.val_json, args.images, args.side, args.stride)
    # The whole-image pass keeps the usual 100 detections: its masks are image-sized
    # (100 x 36 MB at 6000 px, which is the point of slicing).
    predictor = Predictor.from_checkpoint(
        args.checkpoint, device="cpu", score_thresh=0.05,
        max_detections=100 if args.variant == "whole" else args.max_dets,
        optimize=args.fast_precision,
    )
    if args.model_size is not None:  # run tiles at another input size than trained
        cfg = dataclasses.replace(predictor.model.cfg, min_size=args.model_size,
                                  max_size=args.model_size)
        predictor.model.preprocess = Preprocessor(cfg)
        predictor.model.cfg = cfg
    if args.proposals is not None:  # e.g. a tile holding several of the images trained on
        predictor.model.rpn.pre_nms_top_n["test"] = args.proposals
        predictor.model.rpn.post_nms_top_n["test"] = args.proposals
    tile = TileConfig(size=args.tile, overlap=args.overlap, batch_size=args.tile_batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.variant == "whole":
        with torch.inference_mode():
            dets, masks = model_full_pass(predictor.model, predictor.mask_threshold)(canvas)
        results = to_results(predictor, dets, masks, 100)
    elif args.variant in ("tiles", "cells"):
        tiles = model_tile_predictor(predictor.model, predictor.mask_threshold)
        cells = None
        if args.variant == "cells":  # windows on the mosaic's cells instead of the tile grid
            cells = [(x, y, min(x + args.cell, args.side), min(y + args.cell, args.side))
                     for y in range(0, args.side, args.stride)
                     for x in range(0, args.side, args.stride)]
        with torch.inference_mode():
            c = collect(canvas, tiles, tile, None, cells)
        results = to_results(predictor, c.dets, c.masks, args.max_dets)
        # (No result of the cells is from a cut: each object lies inside its cell.)
        if args.variant == "tiles":
            mark_from_cut(results, c, predictor.label_to_cat_id)
    else:
        sliced = args.variant.startswith("sliced")
        predictor.tile = (dataclasses.replace(tile, full_pass=args.variant == "sliced_full")
                          if sliced else None)
        image = canvas if sliced else canvas.float() / 255
        candidates: list[Candidates] = []  # the tiles' detections, kept for mark_from_cut
        keep_candidates = functools.partial(_recording, sliced_module.collect, candidates)
        with unittest.mock.patch.object(sliced_module, "collect", keep_candidates):
            pred = predictor(image)
        assert not isinstance(pred, list) and len(candidates) == 1
        results = pred.to_coco(1, predictor.label_to_cat_id)
        mark_from_cut(results, candidates[0], predictor.label_to_cat_id)
        del image, pred, candidates
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for r in results:
        r["image_id"] = cell_of(r["bbox"], args.side, args.stride)
    return {"variant": args.variant, "seconds": seconds, "detections": len(results),
            "peak_mib": peak / 1024, "before_mib": before / 1024,
            **scores(truth, results, args.max_dets)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/demo/best.pth"))
    parser.add_argument("--val-json", type=Path, default=Path("runs/demo/data/val.json"))
    parser.add_argument("--images", type=Path, default=None,
                        help="image root (default: the JSON's folder)")
    parser.add_argument("--side", type=int, default=6000)
    parser.add_argument("--stride", type=int, default=270,
                        help="pixels between the mosaic's cells (the images are 256 px)")
    parser.add_argument("--cell", type=int, default=256, help="the images' size")
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--tile-batch", type=int, default=4)
    parser.add_argument("--max-dets", type=int, default=MAX_DETS,
                        help="detections kept and scored per image (default 5,000)")
    parser.add_argument("--model-size", type=int, default=None,
                        help="the model's input size (default: as trained); e.g. the tile size "
                        "to run tiles at their own scale")
    parser.add_argument("--proposals", type=int, default=None,
                        help="the RPN's proposals per image (pre- and post-NMS; default: as "
                        "trained)")
    parser.add_argument("--fast-precision", default=None,
                        help="run the fast inference path in this precision (auto, bf16, fp32)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write results.json there")
    args = parser.parse_args()
    if args.stride < args.cell:
        parser.error("--stride must be at least --cell: the cells are scored as images")
    args.images = args.images or args.val_json.parent
    if args.variant is not None:
        print(json.dumps(run_variant(args)))
        return
    rows = []
    for variant in args.variants.split(","):
        argv = sys.argv[1:]
        done = subprocess.run([sys.executable, __file__, *argv, "--variant", variant],
                              capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.side} x {args.side} mosaic, "
          f"{rows[0]['objects']} objects, tiles of {args.tile} px, overlap {args.overlap}")
    print("| variant | mask AP | box AP | mask AR | mask AR small | objects found twice or "
          "more | pieces | split at a tile border | s | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['mask_ap']:.3f} | {r['box_ap']:.3f} | {r['mask_ar']:.3f} "
              f"| {r['mask_ar_small']:.3f} | {r['duplicated_objects']} | {r['pieces']} | "
              f"{r['split_objects']} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
