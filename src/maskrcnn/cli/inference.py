"""The ``maskrcnn predict`` and ``maskrcnn eval`` commands."""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maskrcnn.cli.args import positive_floats, positive_int, probability
from maskrcnn.cli.errors import USAGE, CommandError

if TYPE_CHECKING:
    from maskrcnn.export.onnx_predictor import OnnxPredictor
    from maskrcnn.inference.predictor import Predictor
    from maskrcnn.inference.sliced import TileConfig
    from maskrcnn.inference.tta import TTAConfig


def tta_from_args(args: argparse.Namespace) -> TTAConfig | None:
    from maskrcnn.inference.tta import TTAConfig

    if not args.tta:
        return None
    return TTAConfig(hflip=True, vflip=args.tta_vflip, scales=args.tta_scales,
                     merge=args.tta_merge)


def tile_from_args(args: argparse.Namespace) -> TileConfig | None:
    """Sliced prediction settings, or None without ``--tile``."""
    from maskrcnn.inference.sliced import TileConfig

    if args.tile is None:
        return None
    try:
        return TileConfig(size=args.tile, overlap=args.tile_overlap,
                          batch_size=args.tile_batch, full_pass=args.full_pass)
    except ValueError as err:
        raise CommandError(str(err), USAGE) from None


def fast_from_args(args: argparse.Namespace) -> str | None:
    """The precision of the fast inference path, or None without ``--fast``."""
    return args.fast_precision if args.fast else None


def calibration_from_args(args: argparse.Namespace) -> list[Path] | None:
    """``--fast --fast-precision int8``: up to ``--calibration-images`` files of
    ``--calibration``, spread evenly over its sorted list, or else the training images the
    run listed beside its checkpoint (``calibration.json``); None without int8."""
    import json

    from maskrcnn.inference.files import find_images

    if fast_from_args(args) != "int8":
        return None
    from maskrcnn.engine.trainer import CALIBRATION_FILE, spread

    checkpoint = Path(args.checkpoint)
    listed = checkpoint.parent / CALIBRATION_FILE
    if args.calibration is not None:
        files, _ = find_images([args.calibration])
        where = f"--calibration {args.calibration}"
    elif checkpoint.is_file() and listed.is_file():  # not for a weights name (coco)
        files = [Path(f) for f in json.loads(listed.read_text()).get("images", [])
                 if Path(f).is_file()]
        where = f"{listed} (the training images of the run)"
    else:
        raise CommandError("--fast-precision int8 needs --calibration DIR: images like the ones "
                           "to predict (a few dozen), to measure the activations' ranges", USAGE)
    if not files:
        raise CommandError(f"{where}: no images found there", USAGE)
    return [files[k] for k in spread(len(files), args.calibration_images)]


def load_predictor(
    args: argparse.Namespace, score_thresh: float, optimize: str | None = None
) -> Predictor:
    """The checkpoint's predictor; a CommandError says why it cannot be loaded."""
    from maskrcnn.engine.checkpoint import CheckpointError
    from maskrcnn.inference.predictor import Predictor
    from maskrcnn.model.int8 import Int8Error

    try:
        return Predictor.from_checkpoint(
            args.checkpoint,
            # int8 runs on the CPU, whatever GPU the machine has.
            device=args.device or ("cpu" if optimize == "int8" else None),
            score_thresh=score_thresh,
            tta=tta_from_args(args),
            optimize=optimize,
            tile=tile_from_args(args),
            max_detections=args.max_detections,
            calibration=calibration_from_args(args) if optimize is not None else None,
        )
    except (CheckpointError, ValueError, Int8Error) as err:
        raise CommandError(str(err)) from None


def load_onnx_predictor(args: argparse.Namespace) -> OnnxPredictor:
    """``--backend onnxruntime``: a predictor for the exported ONNX file; a CommandError
    says why it cannot be used."""
    from maskrcnn.export.onnx_predictor import OnnxPredictor

    for flag in ("tta", "fast", "tile"):
        if getattr(args, flag, None):
            raise CommandError(f"--{flag} is not available with --backend onnxruntime")
    try:
        # None: the score threshold stored in the file by `maskrcnn export --score-thresh`.
        cap = getattr(args, "max_detections", None)
        if cap is None:
            return OnnxPredictor(args.checkpoint, score_thresh=args.score_thresh)
        return OnnxPredictor(args.checkpoint, score_thresh=args.score_thresh, max_detections=cap)
    except (ImportError, ValueError) as err:
        raise CommandError(str(err)) from None


def _run_predict(args: argparse.Namespace) -> int:
    from maskrcnn.inference.files import (
        PredictionWriter,
        find_images,
        not_reached,
        overlay_names,
        predict_summary,
        prepare_out,
        read_batches,
    )

    predictor: Predictor | OnnxPredictor
    if args.backend == "onnxruntime":
        predictor = load_onnx_predictor(args)
    else:
        score_thresh = 0.5 if args.score_thresh is None else args.score_thresh
        predictor = load_predictor(args, score_thresh, optimize=fast_from_args(args))
    files, skipped = find_images(args.inputs)
    for s in skipped:
        print(f"skipped {s.file_name}: {s.reason}", file=sys.stderr)
    out = Path(args.out)
    if not files:  # nothing to do: an earlier run's results in --out stay as they are
        raise CommandError(f"no image to predict; {out} is left as it was")
    problem = prepare_out(out)
    if problem is not None:
        raise CommandError(problem, USAGE)
    names = overlay_names(files)
    writer = PredictionWriter(predictor, out, names if args.overlays else None, args.format,
                              names)
    # predictions.json is written however the loop ends (Ctrl-C included): the results of
    # the images done so far are never lost.
    try:
        for batch in read_batches(files, args.batch_size, skipped):
            writer.run(batch, skipped)
    except BaseException as err:
        skipped += not_reached(files, writer, skipped, err)
        raise
    finally:
        try:
            json_path = writer.write(skipped)
        except OSError as err:  # e.g. the disk filled up: the earlier file, if any, is kept
            raise CommandError(f"{out / 'predictions.json'}: cannot write it "
                               f"({err.strerror or err})", USAGE) from None
    print(predict_summary(writer, skipped, json_path))
    return 0 if writer.images else 1


def format_comparison(rows: Sequence[tuple[str, dict[str, Any], float]]) -> str:
    """One line per IoU type and run (``rows``: name, metrics, seconds per image)."""
    from maskrcnn.engine.summary import KEYS

    width = max(len(name) for name, _, _ in rows) + 6
    lines = [" " * width + "".join(f"{k:>8}" for k in KEYS) + f"{'s/img':>9}"]
    for iou_type in ("bbox", "segm"):
        for name, metrics, seconds in rows:
            values = "".join(f"{metrics[iou_type][k]:8.3f}" for k in KEYS)
            lines.append(f"{(iou_type + ' ' + name).strip():{width}}{values}{seconds:9.3f}")
    return "\n".join(lines)


def _run_eval(args: argparse.Namespace) -> int:
    from maskrcnn.data.coco import CocoDataset
    from maskrcnn.data.errors import DatasetError
    from maskrcnn.engine.summary import format_metrics
    from maskrcnn.inference.files import prepare_out
    from maskrcnn.inference.report import write_report
    from maskrcnn.inference.scoring import evaluate_predictor, match_categories

    base = load_predictor(args, score_thresh=0.0)
    predictors = {"": base}
    if args.fast:  # the same weights, read once, on the fast path
        import torch

        from maskrcnn.data.image_input import to_float_image
        from maskrcnn.model.int8 import Int8Error

        files = calibration_from_args(args)
        fast = copy.copy(base)
        model = copy.deepcopy(base.model)
        if files is not None and args.device is None:  # int8 runs on the CPU
            fast.device, model = torch.device("cpu"), model.cpu()
        try:
            fast.model = model.optimize_for_inference(
                args.fast_precision,
                calibration=None if files is None else [to_float_image(f) for f in files],
            )
        except (ValueError, Int8Error) as err:
            raise CommandError(str(err)) from None
        predictors["fast"] = fast
    try:
        dataset = CocoDataset(args.data, args.images, search_subfolders=args.search_subfolders)
        label_map = match_categories(base, dataset)  # before any work
    except (DatasetError, ValueError) as err:
        raise CommandError(str(err)) from None
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    problem = prepare_out(out)  # before the evaluation, not after it
    if problem is not None:
        raise CommandError(problem, USAGE)
    skipped: dict[int, str] = {}
    rows: list[tuple[str, dict[str, Any], float]] = []
    folders = []
    tta = tta_from_args(args)
    views = [("", None), ("TTA", tta)] if tta is not None else [("", None)]
    for mode, predictor in predictors.items():
        for name, view in views:
            predictor.tta = view
            label = " ".join(x for x in (mode, name) if x)
            evaluator, seconds, done = evaluate_predictor(
                predictor, dataset, args.batch_size, skipped, label_map,
                desc=f"eval {label}".strip(),
            )
            if done == 0:
                raise CommandError(f"none of the {len(dataset)} images could be read")
            folder = out.joinpath(*(x.lower() for x in (mode, name) if x))
            metrics = evaluator.save(folder, skipped)
            rows.append((label, metrics, seconds))
            folders.append(folder)
            if args.report:
                page = write_report(folder, evaluator, dataset, metrics, args.report_thresh,
                                    args.report_images)
                print(f"report: {page}")
    print(f"evaluated {done} images of {args.data}, skipped {len(skipped)}")
    for image_id, reason in skipped.items():
        print(f"  skipped image id {image_id}: {reason}")
    if len(rows) == 1:
        print(format_metrics(rows[0][1]))
        print(f"{rows[0][2]:.3f} s per image")
    else:
        print(format_comparison(rows))
    print(f"metrics and PR curves: {', '.join(str(f) for f in folders)}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="checkpoint written by `maskrcnn train`, or a weights name such as "
                   "coco (`maskrcnn weights list`)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="images per batch (default 1)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation (hflip)")
    p.add_argument("--tta-vflip", action="store_true", help="with --tta: vertical flips too")
    p.add_argument("--tta-scales", type=positive_floats, default=(1.0,), metavar="S,S",
                   help="with --tta: scales of the model's input size (default 1.0)")
    p.add_argument("--tta-merge", choices=("nms", "wbf"), default="nms",
                   help="with --tta: merge boxes by per-class NMS or weighted box fusion")
    p.add_argument("--tile", type=positive_int, default=None, metavar="SIZE",
                   help="sliced prediction for large images: square tiles of SIZE pixels, "
                   "each run at the model's input size, objects cut by tile borders merged "
                   "into one instance, masks kept over their boxes (bounded memory)")
    p.add_argument("--tile-overlap", type=probability, default=0.25, metavar="F",
                   help="with --tile: overlap of neighbouring tiles, a fraction of SIZE "
                   "(default 0.25; at least the size of the objects that matter)")
    p.add_argument("--tile-batch", type=positive_int, default=4, metavar="N",
                   help="with --tile: tiles per batch (default 4)")
    p.add_argument("--full-pass", action="store_true",
                   help="with --tile: also predict the whole image at the model's size and "
                   "keep its detections larger than the overlap (objects larger than a tile)")
    p.add_argument("--max-detections", type=positive_int, default=None, metavar="N",
                   help="at most N detections per image (default: the model's "
                   "box_detections_per_img, 100 unless trained otherwise); a warning says "
                   "when the cap cut detections")
    p.add_argument("--fast", action="store_true",
                   help="fast inference path: frozen BatchNorm folded into the convolutions, "
                   "channels-last, reduced-precision autocast (see --fast-precision)")
    p.add_argument("--fast-precision", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                   default="auto",
                   help="with --fast (default auto: bf16 on CPUs with native bf16, fp16 on "
                   "CUDA, else fp32); int8 (CPU, torchao): the backbone and FPN in int8, "
                   "calibrated on --calibration; each new input size compiles first (~20 s)")
    p.add_argument("--calibration", metavar="DIR",
                   help="with --fast-precision int8: images like the ones to predict (default: "
                   "the training images listed in calibration.json beside the checkpoint)")
    p.add_argument("--calibration-images", type=positive_int, default=32, metavar="N",
                   help="with --fast-precision int8: at most N images of --calibration, "
                   "spread over them (default 32)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``predict`` and ``eval`` to a CLI; each sets ``args.func(args) -> int``."""
    p = subparsers.add_parser(
        "predict", help="predict instances on images, folders or globs",
        description="Write OUT/predictions.json (COCO results with RLE masks, or polygons "
        "with --format coco-polygon, plus the images they belong to), with --format labelme "
        "also OUT/labelme/*.json (pre-labels LabelMe opens), and with --overlays "
        "OUT/overlays/*.png. Images that cannot "
        "be read or predicted are reported and skipped (listed in the JSON); exit code 1 "
        "when no image could be predicted, 2 when OUT cannot be used.",
    )
    _add_common(p)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--score-thresh", type=probability, default=None, metavar="T",
                   help="keep detections scoring at least T (default: with --backend "
                   "onnxruntime the score_thresh stored in the file by `maskrcnn export`, "
                   "else 0.5)")
    p.add_argument("--overlays", action="store_true", help="write an overlay PNG per image")
    p.add_argument("--format", choices=("coco-rle", "coco-polygon", "labelme"),
                   default="coco-rle",
                   help="masks in predictions.json as RLE (default) or polygons; labelme: RLE "
                   "there, and a LabelMe file of polygons per image in OUT/labelme")
    p.add_argument("--backend", choices=("pytorch", "onnxruntime"), default="pytorch",
                   help="onnxruntime: CKPT is an ONNX file written by `maskrcnn export` "
                   "(CPU; no --tta, --device ignored)")
    p.set_defaults(func=_run_predict)

    e = subparsers.add_parser(
        "eval", help="COCO box and mask AP of a checkpoint",
        description="COCO box and mask AP on a dataset; writes metrics.json and PR curves. "
        "With --tta and/or --fast: AP and seconds per image of each variant, side by side "
        "(results in DIR/tta, DIR/fast, DIR/fast/tta).",
    )
    _add_common(e)
    e.add_argument("--data", required=True, metavar="VAL.json", help="COCO annotation file")
    e.add_argument("--images", default=None, metavar="DIR",
                   help="image root (default: the JSON's folder)")
    e.add_argument("--search-subfolders", action="store_true",
                   help="find images by basename in subfolders of DIR")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: CKPT's folder/eval; TTA results in DIR/tta)")
    e.add_argument("--report", action="store_true",
                   help="also write DIR/report.html (opens offline): AP tables, per-class "
                   "precision / recall / F1, confusion matrix (also .png and .csv), PR curves, "
                   "the worst images; filterable by class")
    e.add_argument("--report-thresh", type=probability, default=0.5, metavar="T",
                   help="with --report: the score threshold of the operating point (default "
                   "0.5); each class's best-F1 threshold is shown too")
    e.add_argument("--report-images", type=positive_int, default=12, metavar="N",
                   help="with --report: how many of the worst images to show (default 12)")
    e.set_defaults(func=_run_eval)
