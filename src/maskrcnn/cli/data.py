"""The ``maskrcnn data`` command: ``check``, ``convert`` and ``synth`` sub-commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from maskrcnn.cli.errors import CommandError


def _run_check(args: argparse.Namespace) -> int:
    from maskrcnn.data.checks import check_dataset

    report = check_dataset(args.ann_file, args.images, search_subfolders=args.search_subfolders,
                           allow_outside_root=args.allow_outside_root,
                           decode=not args.headers_only, show_progress=True)
    print(report.summary_table(examples=len(report.findings) if args.all else 2))
    failed = not report.ok or (args.strict and bool(report.warnings))
    return 1 if failed else 0


def _describe(out: Path) -> int:
    coco = json.loads(out.read_text())
    # The converter records the folder it made the file names relative to (for LabelMe, the
    # common folder of all images, which the user did not name).
    image_root = coco["info"]["image_root"]
    print(f"wrote {out}: {len(coco['images'])} images, {len(coco['annotations'])} annotations, "
          f"{len(coco['categories'])} categories; file names are relative to {image_root} "
          f"(use it as --images / data.train_images)")
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from maskrcnn.data.converters import labelme_to_coco, mask_pngs_to_coco, yolo_seg_to_coco
    from maskrcnn.data.errors import DatasetError

    try:
        if args.format == "labelme":
            return _describe(labelme_to_coco(args.folder, args.out))
        if args.format == "yolo":
            names = args.names.split(",") if args.names else None
            return _describe(yolo_seg_to_coco(args.root, args.out, names))
        return _describe(mask_pngs_to_coco(args.images_dir, args.masks_dir, args.out,
                                           args.category))
    except DatasetError as err:
        raise CommandError(str(err)) from None


def _run_synth(args: argparse.Namespace) -> int:
    from maskrcnn.data.synthetic import make_synthetic_coco

    try:
        path = make_synthetic_coco(args.out, args.images, size=args.size, seed=args.seed,
                                   split_name=args.split, empty_fraction=args.empty_fraction,
                                   max_objects=args.max_objects)
    except ValueError as err:
        raise CommandError(str(err)) from None
    print(f"wrote {path} and {args.images} images under {Path(args.out) / args.split}")
    return 0


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="report problems in a COCO dataset",
                       description="Check a COCO instance-segmentation dataset: missing "
                       "images, images whose pixels do not decode (every image is decoded, on "
                       "all cores), size mismatches, bad boxes and polygons, unknown or "
                       "duplicate ids and names. Exit code 1 when there is an error.")
    p.add_argument("ann_file", metavar="DATASET.json", help="COCO annotation file")
    p.add_argument("--images", metavar="ROOT", default=None,
                   help="image root folder (default: the JSON's folder)")
    p.add_argument("--search-subfolders", action="store_true",
                   help="accept images found by basename in a subfolder of ROOT")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="report an absolute file_name or one with '..' as a warning, not an "
                   "error (for a dataset loaded with data.allow_outside_root=true)")
    p.add_argument("--headers-only", action="store_true",
                   help="read image headers only (fast; misses truncated or corrupt pixels)")
    p.add_argument("--all", action="store_true", help="list every finding, not 2 per kind")
    p.add_argument("--strict", action="store_true", help="exit code 1 on warnings too")
    p.set_defaults(func=_run_check)


_LABELME_LAYOUT = """\
FOLDER holds LabelMe *.json files (not searched recursively). Each file's imagePath is
resolved relative to that JSON file (e.g. ../images/x.jpg) and the image must exist. The
file names written are relative to the deepest folder holding all images; the command
prints that folder: pass it as --images / data.train_images. Polygons, rectangles and
circles become instances; shapes sharing a label and group_id form one instance; lines and
points are skipped with a warning."""

_YOLO_LAYOUT = """\
ROOT/images/**/NAME.ext pairs with ROOT/labels/**/NAME.txt (same sub-path). Each label
line is one instance: 'class x1 y1 x2 y2 ...' normalised to [0, 1], or 'class cx cy w h'
for a box. An image without a label file has no instances; a label file without an image
is listed in a warning (an error when no label file pairs with any image). Class i
becomes category id i + 1, named from --names, else ROOT/data.yaml, else
ROOT/classes.txt. File names are relative to ROOT/images."""

_MASKS_LAYOUT = """\
Each image IMAGES_DIR/NAME.ext pairs with MASKS_DIR/NAME.png or MASKS_DIR/NAME_mask.png of
the same size, where 0 is background and every other value (palette index, grey level or
RGB colour) is one instance, all of one category. File names are relative to IMAGES_DIR."""


def _add_convert(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("convert", help="convert LabelMe, YOLO-seg or mask PNGs to COCO JSON",
                       description="Convert annotations to a COCO JSON whose file names are "
                       "relative to an image folder, which the command prints.")
    formats = p.add_subparsers(dest="format", required=True, metavar="{labelme,yolo,masks}")
    raw = argparse.RawDescriptionHelpFormatter
    labelme = formats.add_parser("labelme", help="a folder of LabelMe *.json files",
                                 description=_LABELME_LAYOUT, formatter_class=raw)
    labelme.add_argument("folder", metavar="FOLDER", help="folder of LabelMe *.json files")
    yolo = formats.add_parser("yolo", help="ROOT/images + ROOT/labels/*.txt polygons",
                              description=_YOLO_LAYOUT, formatter_class=raw)
    yolo.add_argument("root", metavar="ROOT",
                      help="dataset folder holding images/ and labels/ (and data.yaml)")
    yolo.add_argument("--names", metavar="A,B,C", default=None,
                      help="class names, comma-separated (default: data.yaml or classes.txt)")
    masks = formats.add_parser("masks", help="one instance-id PNG per image (Penn-Fudan style)",
                               description=_MASKS_LAYOUT, formatter_class=raw)
    masks.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images (not "
                       "searched recursively)")
    masks.add_argument("masks_dir", metavar="MASKS_DIR",
                       help="folder of instance-id masks NAME.png or NAME_mask.png")
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
    p.add_argument("--split", default="train", metavar="NAME",
                   help="split name, a plain folder name (default train)")
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
