"""The ``maskrcnn data`` command: ``check``, ``convert`` and ``synth`` sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from maskrcnn.data.checks import check_dataset
from maskrcnn.data.converters import labelme_to_coco, mask_pngs_to_coco, yolo_seg_to_coco
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.synthetic import make_synthetic_coco


def _run_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.ann_file, args.images, search_subfolders=args.search_subfolders)
    print(report.summary_table(examples=len(report.findings) if args.all else 2))
    failed = not report.ok or (args.strict and bool(report.warnings))
    return 1 if failed else 0


def _describe(out: Path, image_root: Path) -> int:
    coco = json.loads(out.read_text())
    print(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, "
          f"{len(coco['categories'])} categories; file names are relative to {image_root}")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    try:
        if args.format == "labelme":
            return _describe(labelme_to_coco(args.folder, args.out), Path(args.folder))
        if args.format == "yolo":
            names = args.names.split(",") if args.names else None
            return _describe(yolo_seg_to_coco(args.root, args.out, names),
                             Path(args.root) / "images")
        out = mask_pngs_to_coco(args.images_dir, args.masks_dir, args.out, args.category)
        return _describe(out, Path(args.images_dir))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run_synth(args: argparse.Namespace) -> int:
    try:
        path = make_synthetic_coco(args.out, args.images, size=args.size, seed=args.seed,
                                   split_name=args.split, empty_fraction=args.empty_fraction,
                                   max_objects=args.max_objects)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} and {args.images} images under {Path(args.out) / args.split}")
    return 0


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="report problems in a COCO dataset",
                       description="Check a COCO instance-segmentation dataset: missing or "
                       "unreadable images, size mismatches, bad boxes and polygons, unknown or "
                       "duplicate ids and names. Exit code 1 when there is an error.")
    p.add_argument("ann_file", metavar="DATASET.json", help="COCO annotation file")
    p.add_argument("--images", metavar="ROOT", default=None,
                   help="image root folder (default: the JSON's folder)")
    p.add_argument("--search-subfolders", action="store_true",
                   help="accept images found by basename in a subfolder of ROOT")
    p.add_argument("--all", action="store_true", help="list every finding, not 2 per kind")
    p.add_argument("--strict", action="store_true", help="exit code 1 on warnings too")
    p.set_defaults(func=_run_check)


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="convert LabelMe, YOLO-seg or mask PNGs to COCO JSON",
                       description="Convert annotations to a COCO JSON whose file names are "
                       "relative to the image folder.")
    formats = p.add_subparsers(dest="format", required=True, metavar="{labelme,yolo,masks}")
    labelme = formats.add_parser("labelme", help="a folder of LabelMe *.json files",
                                 description="Convert a folder of LabelMe *.json files.")
    labelme.add_argument("folder", metavar="FOLDER")
    yolo = formats.add_parser("yolo", help="ROOT/images + ROOT/labels/*.txt polygons",
                              description="Convert an Ultralytics segmentation dataset.")
    yolo.add_argument("root", metavar="ROOT")
    yolo.add_argument("--names", metavar="A,B,C", default=None,
                      help="class names, comma-separated (default: data.yaml or classes.txt)")
    masks = formats.add_parser("masks", help="one instance-id PNG per image (Penn-Fudan style)",
                               description="Convert instance-id mask PNGs (0 = background).")
    masks.add_argument("images_dir", metavar="IMAGES_DIR")
    masks.add_argument("masks_dir", metavar="MASKS_DIR")
    masks.add_argument("--category", default="object", help="category name (default: object)")
    for parser in (labelme, yolo, masks):
        parser.add_argument("--out", metavar="FILE.json", required=True, help="COCO JSON to write")
        parser.set_defaults(func=_run_convert)


def _add_synth(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("synth", help="generate a synthetic shapes dataset",
                       description="Write OUT/SPLIT.json and OUT/SPLIT/*.png: circles, "
                       "rectangles and triangles on textured backgrounds.")
    p.add_argument("out", metavar="OUT", help="output folder")
    p.add_argument("--images", type=int, default=200, metavar="N", help="number of images")
    p.add_argument("--size", type=int, default=128, metavar="S", help="image side in pixels")
    p.add_argument("--seed", type=int, default=0, metavar="K", help="random seed")
    p.add_argument("--split", default="train", metavar="NAME", help="split name (default train)")
    p.add_argument("--empty-fraction", type=float, default=0.1, metavar="F",
                   help="share of images without objects (default 0.1)")
    p.add_argument("--max-objects", type=int, default=4, metavar="M",
                   help="most shapes in one image (default 4)")
    p.set_defaults(func=_run_synth)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``data`` with sub-commands ``check``, ``convert`` and ``synth`` to a CLI.

    Each sub-command sets ``args.func(args) -> int``, the exit code.
    """
    data = subparsers.add_parser("data", help="check, convert and generate datasets",
                                 description="Dataset tools: check, convert, synth.")

    def print_help(_: argparse.Namespace) -> int:
        data.print_help()
        return 2

    data.set_defaults(func=print_help)
    sub = data.add_subparsers(title="commands", metavar="{check,convert,synth}")
    _add_check(sub)
    _add_convert(sub)
    _add_synth(sub)
