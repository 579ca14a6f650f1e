"""A training configuration small enough for unit tests (seconds on two CPU cores)."""

from __future__ import annotations

from pathlib import Path

from maskrcnn.config import TrainConfig, load_train_config

TINY = [
    "model.backbone=mobilenet_v2",
    "model.min_size=96",
    "model.max_size=96",
    "model.anchor_sizes=[16,32,64,128,256]",
    "model.rpn_pre_nms_top_n_train=300",
    "model.rpn_post_nms_top_n_train=100",
    "model.rpn_pre_nms_top_n_test=200",
    "model.rpn_post_nms_top_n_test=50",
    "model.rpn_batch_size_per_image=64",
    "model.box_batch_size_per_image=32",
    "model.box_detections_per_img=20",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.synthetic_train_images=12",
    "data.synthetic_val_images=4",
    "data.synthetic_size=64",
    "solver.base_lr=0.01",
    "solver.warmup_iters=8",
    "solver.warmup_factor=0.1",
    "solver.grad_clip_norm=5.0",
    "solver.steps=[100]",
    "solver.precision=fp32",
    "run.log_period=1",
    "run.checkpoint_period=1000",
    "run.num_overlays=1",
]


def tiny_config(out: Path, *overrides: str) -> TrainConfig:
    return load_train_config(None, [*TINY, f"run.output_dir={out}", *overrides])
