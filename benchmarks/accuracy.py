"""Accuracy on real photos: torchvision's Mask R-CNN and ours, trained the same way.

Both models are built with the same architecture and start from the same weights (ours is
built from the settings, torchvision's from torchvision's own classes, then given our state
dict), and both are trained by the same loop (``maskrcnn.engine.trainer.Trainer``: same
batches, augmentation, optimiser, schedule and precision) and scored by the same evaluator.
Then our recipe (``--recipe``, default ``finetune_small``) trains for the wall-clock time
torchvision's run took. Each contender runs ``--repeats`` times with different seeds.

    python benchmarks/accuracy.py --train-json T.json --train-images DIR \\
        --val-json V.json --val-images DIR --out runs/bench_accuracy/NAME

Settings (``key=value`` after the options) override the shared settings below, ``--set
key=value`` applies to every contender; prints a Markdown table and writes ``results.json``
in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d

from maskrcnn.config import (
    ModelConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_train_config,
    recipe_path,
    to_dict,
)
from maskrcnn.data.coco import CocoDataset
from maskrcnn.engine.build import build_datasets, resolve_model_config
from maskrcnn.engine.evaluation import evaluate
from maskrcnn.engine.trainer import Trainer
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.model.norms import group_norm
from maskrcnn.utils.malloc import retain_freed_memory

log = logging.getLogger("maskrcnn")

# The shared settings: a tutorial-style fine-tune of an ImageNet MobileNetV2-FPN.
SHARED = [
    "model.backbone=mobilenet_v2",
    "model.trainable_backbone_layers=5",
    "model.norm=bn",
    "model.min_size=400",
    "model.max_size=666",
    "data.batch_size=2",
    "data.num_workers=1",
    "data.train_augmentation=[{name: hflip, p: 0.5}, {name: to_float}]",
    "solver.base_lr=0.01",
    "solver.momentum=0.9",
    "solver.weight_decay=0.0001",
    "solver.warmup_iters=50",
    "solver.steps=[162]",
    "solver.max_iter=203",
    "solver.precision=fp32",
    "run.eval_period=0",
    "run.checkpoint_period=100000",
    "run.num_overlays=0",
]


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "gn":
        return group_norm
    return nn.BatchNorm2d if norm in ("bn", "syncbn") else FrozenBatchNorm2d


def _torchvision_body(cfg: ModelConfig) -> nn.Module:
    """torchvision's network whose children are our body's layers (names included)."""
    if cfg.backbone.startswith("resnet"):
        return getattr(models, cfg.backbone)(weights=None, norm_layer=_norm_layer(cfg.norm))
    if cfg.backbone == "mobilenet_v2":
        return models.mobilenet_v2(weights=None, norm_layer=_norm_layer(cfg.norm)).features
    return models.vgg16(weights=None).features


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, name = dotted.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, name, module)


def torchvision_twin(ours: MaskRCNN) -> TVMaskRCNN:
    """torchvision's ``MaskRCNN`` with the architecture of ``ours`` (backbone, norms of the
    trainable and frozen stages, FPN, anchors, sizes, thresholds), built from torchvision's
    classes, with the weights of ``ours`` and the same parameters frozen."""
    cfg = ours.cfg
    body = _torchvision_body(cfg)
    return_layers = dict(ours.backbone.body.return_layers)
    for name, module in ours.backbone.body.named_modules():
        if isinstance(module, FrozenBatchNorm2d):  # a frozen stage's norm
            _set_module(body, name, FrozenBatchNorm2d(module.weight.numel()))
    channels = [
        ours.backbone.fpn.inner_blocks[i][0].in_channels for i in range(len(return_layers))
    ]
    backbone = BackboneWithFPN(body, return_layers, channels, cfg.fpn_channels)
    levels = len(cfg.anchor_sizes)
    width = cfg.fpn_channels  # our mask branch is as wide as the FPN (256 in torchvision's)
    masks = 1 if cfg.class_agnostic_masks else cfg.num_classes
    theirs = TVMaskRCNN(
        backbone,
        None,  # the number of classes is in the predictors
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
        rpn_anchor_generator=AnchorGenerator(
            tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * levels
        ),
        rpn_pre_nms_top_n_train=cfg.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_nms_thresh=cfg.rpn_nms_thresh,
        rpn_fg_iou_thresh=cfg.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=cfg.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        rpn_positive_fraction=cfg.rpn_positive_fraction,
        rpn_score_thresh=cfg.rpn_score_thresh,
        box_score_thresh=cfg.box_score_thresh,
        box_nms_thresh=cfg.box_nms_thresh,
        box_detections_per_img=cfg.box_detections_per_img,
        box_fg_iou_thresh=cfg.box_fg_iou_thresh,
        box_bg_iou_thresh=cfg.box_bg_iou_thresh,
        box_batch_size_per_image=cfg.box_batch_size_per_image,
        box_positive_fraction=cfg.box_positive_fraction,
        bbox_reg_weights=cfg.bbox_reg_weights,
        box_predictor=FastRCNNPredictor(1024, cfg.num_classes),
        mask_head=MaskRCNNHeads(width, [width] * 4, 1),
        mask_predictor=MaskRCNNPredictor(width, width, masks),
    )
    theirs.load_state_dict(ours.state_dict())
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    for name, p in theirs.named_parameters():
        p.requires_grad_(name not in frozen)
    return theirs


def train_and_score(cfg: TrainConfig, net: nn.Module | None) -> dict[str, Any]:
    """Train ``net`` (ours from ``cfg`` when None) with ``cfg``, then score it on the
    validation set; training and evaluation are timed apart."""
    val = dataclasses.replace(cfg.data, val_json=None, val_images=None)
    trainer = Trainer(dataclasses.replace(cfg, data=val), show_progress=False, net=net)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    _, val_set = build_datasets(cfg.data)
    assert val_set is not None
    start = time.perf_counter()
    metrics = evaluate(trainer.net, val_set, trainer.device, batch_size=cfg.data.batch_size)
    return {
        "box_ap": metrics["bbox"]["AP"],
        "mask_ap": metrics["segm"]["AP"],
        "train_s": train_s,
        "eval_s": time.perf_counter() - start,
        "iterations": cfg.solver.max_iter,
        "per_class_mask_ap": metrics["segm"].get("per_class"),
        "per_class_box_ap": metrics["bbox"].get("per_class"),
    }


def shared_config(data: list[str], settings: list[str], out: Path, seed: int) -> TrainConfig:
    runs = [f"run.output_dir={out}", f"run.seed={seed}"]
    return from_dict(TrainConfig, apply_overrides({}, SHARED + data + settings + runs))


def recipe_config(recipe: str, data: list[str], out: Path, seed: int, iters: int) -> TrainConfig:
    """``recipe`` (with the overrides ``data``) for ``iters`` iterations, its schedule (decay
    steps, warm-up) scaled to them."""
    base = load_train_config(recipe_path(recipe), data)
    scale = iters / base.solver.max_iter
    steps = ",".join(str(max(1, round(s * scale))) for s in base.solver.steps)
    if base.solver.schedule == "cosine":
        steps = ""  # no decay steps: the cosine reaches 0 at max_iter
    warmup = min(base.solver.warmup_iters, max(1, iters // 5))
    return load_train_config(
        recipe_path(recipe),
        [
            *data,
            f"solver.max_iter={iters}",
            f"solver.steps=[{steps}]",
            f"solver.warmup_iters={warmup}",
            "run.eval_period=0",
            "run.checkpoint_period=100000",
            "run.num_overlays=0",
            f"run.output_dir={out}",
            f"run.seed={seed}",
        ],
    )


def seconds_per_iteration(cfg: TrainConfig) -> float:
    """The recipe's training speed on this machine: two short runs, the difference."""
    times = []
    for n in (2, 6):
        probe = dataclasses.replace(
            cfg,
            solver=dataclasses.replace(cfg.solver, max_iter=n, steps=(), warmup_iters=0),
            data=dataclasses.replace(cfg.data, val_json=None, val_images=None),
        )
        start = time.perf_counter()
        Trainer(probe, show_progress=False).train()
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / 4


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    data = [
        f"data.train_json={args.train_json}",
        f"data.train_images={args.train_images}",
        f"data.val_json={args.val_json}",
        f"data.val_images={args.val_images}",
        *args.set,
    ]
    class_names = CocoDataset(args.train_json, args.train_images).class_names
    results: dict[str, list[dict[str, Any]]] = {"torchvision": [], "ours": [], "recipe": []}
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        for name in ("torchvision", "ours"):
            if name not in args.contenders:
                continue
            cfg = shared_config(data, args.settings, out / f"{name}_{repeat}", seed)
            model_cfg = resolve_model_config(cfg.model, class_names)
            torch.manual_seed(seed)
            ours = MaskRCNN(model_cfg)
            net = torchvision_twin(ours) if name == "torchvision" else ours
            results[name].append(train_and_score(cfg, net))
            log.warning("%s run %d: %s", name, repeat, results[name][-1])
        if "recipe" not in args.contenders:
            continue
        recipe_data = [*data, *args.recipe_set]
        iters = args.recipe_iters
        if iters is None:
            budget = args.budget_s or (results["torchvision"] or results["ours"])[-1]["train_s"]
            probe = recipe_config(args.recipe, recipe_data, out / "probe", seed, 10)
            iters = max(1, int(budget / seconds_per_iteration(probe)))
        cfg = recipe_config(args.recipe, recipe_data, out / f"recipe_{repeat}", seed, iters)
        results["recipe"].append(train_and_score(cfg, None))
        log.warning("recipe run %d: %s", repeat, results["recipe"][-1])
    report = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "shared_settings": to_dict(shared_config(data, args.settings, out, args.seed)),
        "recipe": args.recipe,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    return report


def table(report: dict[str, Any]) -> str:
    rows = ["| run | box AP | mask AP | training, s |", "| --- | --- | --- | --- |"]
    for name, runs in report["results"].items():
        if not runs:
            continue

        def spread(key: str, runs: list[dict[str, Any]] = runs) -> str:
            values = [r[key] for r in runs]
            text = " / ".join(f"{v:.3f}" if key != "train_s" else f"{v:.0f}" for v in values)
            if len(values) > 1 and key != "train_s":
                text += f" (mean {statistics.mean(values):.3f})"
            return text

        rows.append(f"| {name} | {spread('box_ap')} | {spread('mask_ap')} | {spread('train_s')} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in ("train-json", "train-images", "val-json", "val-images"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--out", default="runs/bench_accuracy")
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender (seeds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", default="finetune_small")
    parser.add_argument("--recipe-iters", type=int, default=None,
                        help="iterations of the recipe (default: as many as fit the budget)")
    parser.add_argument("--recipe-set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override of the recipe alone (ablations); repeatable")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the recipe's training time (default: torchvision's in this run)")
    parser.add_argument("--contenders", default="torchvision,ours,recipe",
                        help="comma-separated subset of torchvision,ours,recipe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every contender, the recipe included "
                        "(e.g. data.search_subfolders=true); repeatable")
    parser.add_argument("settings", nargs="*", help="key=value overrides of the shared settings")
    args = parser.parse_args(argv)
    args.contenders = set(args.contenders.split(","))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    retain_freed_memory()  # as the maskrcnn command does; the same for every contender
    report = run(args)
    print(f"{report['machine']}\n\n{table(report)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
