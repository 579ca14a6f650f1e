"""``maskrcnn bench``: ours against torchvision, same weights, same inputs, one process."""

from __future__ import annotations

import argparse

from maskrcnn.cli.args import positive_int
from maskrcnn.cli.errors import USAGE, CommandError

# The parts of the report (``--skip``); maskrcnn.bench.run checks them by these names.
SECTIONS = ("inference", "int8", "train", "paste", "loading", "memory", "onnx")


def _image_size(text: str) -> tuple[int, int]:
    """``HxW`` with two positive integers."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW, e.g. 800x1088") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: both sides must be positive")
    return h, w


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}"
        )
    return names


def _bench(args: argparse.Namespace) -> int:
    from maskrcnn import bench

    try:
        return bench.main(args.size, args.repeats, args.weights, args.skip, args.json,
                          args.device)
    except ValueError as err:
        raise CommandError(str(err), USAGE) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``bench`` to the CLI."""
    p = sub.add_parser(
        "bench",
        help="time ours against torchvision (same weights, same inputs, one process)",
        description="Inference (torchvision, ours, ours exact fast-path, ours fast; on a CPU "
        "with torchao also int8), a training step (batch 2), mask paste (100 masks), data "
        "loading and peak memory; medians of alternating runs, ratios against torchvision.",
    )
    p.add_argument("--size", type=_image_size, default="800x1088",
                   help="image size HxW (default 800x1088)")
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="timed runs of each (default 3)")
    p.add_argument(
        "--weights",
        help="state dict or checkpoint of a ResNet-50-FPN model (default: random weights)",
    )
    p.add_argument(
        "--skip", type=_sections, default="", help="comma list of: " + ",".join(SECTIONS)
    )
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where both models run (default cpu); cuda times fp16 fast mode and training, "
        "torchvision under autocast too, and the GPU's peak memory",
    )
    p.set_defaults(func=_bench)


