"""The ``maskrcnn`` command: ``train``, ``eval``, ``data``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import yaml

from maskrcnn.bench import SECTIONS
from maskrcnn.cli_args import positive_int
from maskrcnn.config import load_train_config
from maskrcnn.data.errors import DatasetError
from maskrcnn.engine.checkpoint import CheckpointError

RECIPES = "maskrcnn.configs"
LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def recipe_path(name_or_path: str) -> Path:
    """A YAML file path, or the name of a recipe shipped with the package (``demo``...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = resources.files(RECIPES) / f"{name_or_path}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(
        p.name[:-5] for p in resources.files(RECIPES).iterdir() if p.name.endswith(".yaml")
    )
    raise ValueError(f"config {name_or_path!r} is neither a file nor a recipe ({', '.join(names)})")


def launch_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes per node."""
    forwarded, skip_value = [], False
    for a in argv:
        if skip_value:
            skip_value = False
        elif a.startswith(LAUNCH_FLAGS):
            skip_value = "=" not in a
        else:
            forwarded.append(a)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        f"--nnodes={args.nnodes}",
        f"--node_rank={args.node_rank}",
    ]
    if args.rdzv_endpoint:
        cmd += ["--rdzv_backend=c10d", f"--rdzv_endpoint={args.rdzv_endpoint}"]
    else:
        cmd += ["--standalone"]
    return subprocess.call([*cmd, "-m", "maskrcnn", *forwarded])


def _train(args: argparse.Namespace) -> int:
    from maskrcnn.engine.distributed import shutdown
    from maskrcnn.engine.summary import print_summary
    from maskrcnn.engine.trainer import Trainer

    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        if args.nnodes > 1 and not args.rdzv_endpoint:
            print("error: --nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, "
                  "the same on every node)", file=sys.stderr)
            return 2
        if not 0 <= args.node_rank < args.nnodes:
            print(f"error: --node-rank must be in 0..{args.nnodes - 1}, got {args.node_rank}",
                  file=sys.stderr)
            return 2
        return launch_torchrun(args, args.argv)

    config = args.config
    if config is None and not any(o.startswith("data.train_json=") for o in args.overrides):
        config = "demo"
        print(
            "no dataset given: running the embedded default (synthetic shapes, "
            "MobileNetV2-FPN fine-tune); see `maskrcnn train --help`"
        )
    try:
        cfg = load_train_config(recipe_path(config) if config else None, args.overrides)
    except ValueError as err:  # a malformed override or an invalid setting: no traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.data.train_json is None and config != "demo":
        print("note: data.train_json is not set: training on the embedded synthetic shapes "
              "(set data.train_json=... and data.train_images=... for your data)")
    try:
        trainer = Trainer(cfg, resume=args.resume)
    except ValueError as err:  # settings only the data can check, e.g. the class count
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = trainer.train()
    if trainer.dist.is_main:
        print_summary(trainer, metrics)
    shutdown(trainer.dist)
    return 0


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (no arguments: the embedded synthetic-shapes demo)",
        # The launch flags are removed by name before the command is run again under
        # torchrun: an abbreviation (--npr 2) would reach the workers and relaunch them.
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train Mask R-CNN on a COCO dataset.",
        epilog="""overrides (section.key=value), the main ones:
  data.train_json=FILE data.train_images=DIR data.val_json=FILE data.val_images=DIR
  data.batch_size=2 data.num_workers=2 data.search_subfolders=true data.on_bad_sample=skip
  model.backbone=resnet50|resnet18|mobilenet_v2|... model.backbone_weights=FILE
  model.min_size=800 model.max_size=1333 model.trainable_backbone_layers=3
  solver.base_lr=0.02 solver.max_iter=90000 solver.schedule=multistep|cosine
  solver.steps=[60000,80000] solver.warmup_iters=1000 solver.accumulation_steps=1
  solver.precision=auto|fp32|bf16|fp16 solver.grad_clip_norm=10
  run.output_dir=runs/x run.eval_period=5000 run.checkpoint_period=500 run.seed=0

recipes: demo, coco_r50_fpn_1x, finetune_small (or a YAML file of your own)
example: maskrcnn train --config finetune_small data.train_json=train.json \\
           data.train_images=images/ data.val_json=val.json data.val_images=images/""",
    )
    p.add_argument("--config", help="YAML file or recipe name")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUTPUT_DIR/last.pth (a new run if there is none); the optimizer "
        "and schedule state come from the checkpoint",
    )
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="processes per node: launches torchrun (one per GPU, or CPU processes)",
    )
    p.add_argument("--nnodes", type=positive_int, default=1,
                   help="number of machines (with --nproc)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    p.add_argument("--rdzv-endpoint", help="host:port of node 0, for multi-node runs")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    p.set_defaults(func=_train)


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
        print(f"error: {err}", file=sys.stderr)
        return 2


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="time ours against torchvision (same weights, same inputs, one process)",
        description="Inference (torchvision, ours, ours exact fast-path, ours fast), a "
        "training step (batch 2), mask paste (100 masks), data loading and peak memory; "
        "medians of alternating runs, ratios against torchvision.",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskrcnn",
        description="Mask R-CNN instance segmentation: train, evaluate, "
        "check and convert datasets.",
        epilog="The command keeps the memory it frees for reuse (fewer page faults per "
        "image, see docs/performance.md); MASKRCNN_MALLOC=system leaves the C library's "
        "default.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_bench(sub)
    from maskrcnn.data.cli import register as register_data

    register_data(sub)
    from maskrcnn.inference_cli import register as register_inference

    register_inference(sub)
    from maskrcnn.export_cli import register as register_export

    register_export(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return int(args.func(args))
    except (DatasetError, CheckpointError, yaml.YAMLError) as err:
        # Problems with the user's files: the message says what and where; no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError) as err:
        # An output path that is a file where a folder is needed, or the other way round.
        where = err.filename2 or err.filename
        print(f"error: {where}: {err.strerror}" if where and err.strerror else f"error: {err}",
              file=sys.stderr)
        return 2


def run() -> None:
    """The console entry point: ``main`` in a process that reuses the memory it frees
    (see ``maskrcnn.malloc``)."""
    from maskrcnn.malloc import retain_freed_memory

    retain_freed_memory()
    sys.exit(main())


if __name__ == "__main__":
    run()
