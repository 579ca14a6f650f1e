"""The ``maskrcnn export`` command: a training checkpoint → an ONNX file or a torch.export
archive."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from maskrcnn.cli.args import probability
from maskrcnn.cli.errors import CommandError

FORMATS = ("onnx", "torch-export")


def _run_export(args: argparse.Namespace) -> int:
    from maskrcnn.engine.build import model_from_checkpoint
    from maskrcnn.engine.checkpoint import CheckpointError
    from maskrcnn.export.api import export_onnx, export_torch

    try:
        trained = model_from_checkpoint(args.checkpoint)
    except (CheckpointError, ValueError) as err:
        raise CommandError(str(err)) from None
    model, names, label_map = trained.model, trained.class_names, trained.label_to_cat_id
    print(f"exporting {args.checkpoint} to {args.format} (tracing and translating take a "
          "minute or so)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        if args.format == "onnx":
            path = export_onnx(model, args.out, names, label_map, opset=args.opset,
                               score_thresh=args.score_thresh)
        else:
            path = export_torch(model, args.out, names, label_map, score_thresh=args.score_thresh)
    except ImportError as err:  # onnxscript (the ONNX exporter's backend) is missing
        raise CommandError(
            f"{err}; install the export extra: pip install 'maskrcnn[export]'"
        ) from None
    except ValueError as err:  # e.g. the exporter did not produce the opset asked for
        raise CommandError(str(err)) from None
    except OSError as err:  # a full disk: the previous file, if any, is left as it was
        raise CommandError(f"{args.out}: {err}") from None
    seconds = time.perf_counter() - start
    size_mb = path.stat().st_size / 2**20
    print(f"wrote {path} ({args.format}, {size_mb:.1f} MiB) in {seconds:.0f} s")
    print(f"classes: {', '.join(names[1:]) if names else 'unknown'}")
    print("input: image float32 (3, H, W) in [0, 1], any size; outputs: boxes, labels, scores, "
          "masks (probabilities at the input size); see docs/deployment.md")
    return 0


def _opset(text: str) -> int:
    """An --opset value: an int of at least ``MIN_OPSET`` (what the exporter can write)."""
    from maskrcnn.export.api import MIN_OPSET  # torch: only once `export` is chosen

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < MIN_OPSET:
        raise argparse.ArgumentTypeError(
            f"{value} is too low: the exporter writes opset {MIN_OPSET} or later (the NMS "
            f"is opset-{MIN_OPSET} code)"
        )
    return value


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``export`` to a CLI; it sets ``args.func(args) -> int``."""
    p = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX or torch.export (any image size)",
        description="Write the model of a training checkpoint as one graph that takes an "
        "image of any size, (3, H, W) float32 in [0, 1], and returns boxes, labels, scores "
        "and masks at the input size; resizing, normalisation and post-processing are inside. "
        "Class names, the label → category id map and thresholds go in the file's metadata.",
    )
    p.add_argument("checkpoint", metavar="CKPT",
                   help="checkpoint written by `maskrcnn train`, or a weights name such as "
                   "coco (`maskrcnn weights list`)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (run with onnxruntime) or torch-export (.pt2); default onnx")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="output file")
    p.add_argument("--opset", type=_opset, default=18, metavar="N",
                   help="ONNX opset, 18 or later (default 18, what torch's exporter writes "
                   "natively); the export fails if the file would have another")
    p.add_argument("--score-thresh", type=probability, default=0.5, metavar="T",
                   help="score threshold suggested in the metadata (default 0.5); the "
                   "model's own box_score_thresh applies inside the graph")
    p.set_defaults(func=_run_export)
