"""The table printed at the end of a training run."""

from __future__ import annotations

from typing import Any

from maskrcnn.engine.trainer import Trainer

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small table: one row per IoU type, COCO's summary numbers as columns."""
    lines = [f"{'':6}" + "".join(f"{k:>8}" for k in KEYS)]
    for iou_type in ("bbox", "segm"):
        if iou_type in metrics:
            row = metrics[iou_type]
            lines.append(f"{iou_type:6}" + "".join(f"{row[k]:8.3f}" for k in KEYS))
    return "\n".join(lines)


def print_summary(trainer: Trainer, metrics: dict[str, Any]) -> None:
    out = trainer.out
    print()
    print(
        f"trained {trainer.iteration} iterations ({trainer.epoch} epochs) "
        f"in {trainer.precision}; skipped samples: {trainer.skipped_samples}"
    )
    if metrics:
        print(format_metrics(metrics))
    rows = [
        ("checkpoint", out / "last.pth"),
        ("best checkpoint", out / "best.pth"),
        ("config", out / "config.yaml"),
        ("metrics", out / "metrics.json"),
        ("metrics log", out / "metrics.jsonl"),
        ("tensorboard", out / "tensorboard"),
        ("loss curves", out / "loss_curves.png"),
        ("AP curve", out / "ap_curve.png"),
        ("overlays", out / "overlays"),
    ]
    for name, path in rows:
        if path.exists():
            print(f"  {name:16} {path}")
