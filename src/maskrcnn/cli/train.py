"""``maskrcnn train``: one process, or several under torchrun (``--nproc``, ``--nnodes``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from maskrcnn.cli.args import positive_int
from maskrcnn.cli.errors import USAGE, CommandError

LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


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
    if (args.nproc > 1 or args.nnodes > 1) and "LOCAL_RANK" not in os.environ:
        if args.nnodes > 1 and not args.rdzv_endpoint:
            raise CommandError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, "
                               "the same on every node)", USAGE)
        if not 0 <= args.node_rank < args.nnodes:
            raise CommandError(
                f"--node-rank must be in 0..{args.nnodes - 1}, got {args.node_rank}", USAGE
            )
        return launch_torchrun(args, args.argv)

    from maskrcnn.config import load_train_config, recipe_path
    from maskrcnn.engine.distributed import shutdown
    from maskrcnn.engine.summary import print_summary
    from maskrcnn.engine.trainer import Trainer

    config = args.config
    if config is None and not any(o.startswith("data.train_json=") for o in args.overrides):
        config = "demo"
        print(
            "no dataset given: running the embedded default (synthetic shapes, "
            "MobileNetV2-FPN fine-tune); see `maskrcnn train --help`"
        )
    try:
        cfg = load_train_config(recipe_path(config) if config else None, args.overrides)
    except ValueError as err:  # a malformed override or an invalid setting
        raise CommandError(str(err), USAGE) from None
    if cfg.data.train_json is None and config != "demo":
        print("note: data.train_json is not set: training on the embedded synthetic shapes "
              "(set data.train_json=... and data.train_images=... for your data)")
    try:
        trainer = Trainer(cfg, resume=args.resume)
    except ValueError as err:  # settings only the data can check, e.g. the class count
        raise CommandError(str(err), USAGE) from None
    metrics = trainer.train()
    if trainer.dist.is_main:
        print_summary(trainer, metrics)
    shutdown(trainer.dist)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``train`` to the CLI."""
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


