"""Evaluation of a model on a COCO dataset: AP, and overlays of a few images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import build_loader
from maskrcnn.engine.evaluator import CocoEvaluator
from maskrcnn.model.mask_rcnn import MaskRCNN
from maskrcnn.precision import autocast
from maskrcnn.visualize import draw_instances, save_overlay, side_by_side


@torch.no_grad()
def predict_dataset(
    model: MaskRCNN,
    dataset: CocoDataset,
    device: torch.device,
    batch_size: int = 2,
    precision: str = "fp32",
    show_progress: bool = False,
) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Predictions (on the CPU) for every image of ``dataset``, in order, with their ids."""
    model.eval()
    loader = build_loader(
        dataset, batch_size, shuffle=False, num_workers=0, aspect_ratio_grouping=False
    )
    predictions, ids = [], []
    for images, targets in tqdm(loader, desc="eval", disable=not show_progress, leave=False):
        with autocast(precision, device):
            out = model([im.to(device) for im in images])
        predictions += [
            {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()}
            for o in out
        ]
        ids += [int(t["image_id"]) for t in targets]
    return predictions, ids


def evaluate(
    model: MaskRCNN,
    dataset: CocoDataset,
    device: torch.device,
    batch_size: int = 2,
    precision: str = "fp32",
    overlay_dir: str | Path | None = None,
    num_overlays: int = 4,
    show_progress: bool = False,
) -> dict[str, Any]:
    """COCO bbox and segm metrics of ``model`` on ``dataset``; with ``overlay_dir``, ground
    truth and prediction side by side for the first ``num_overlays`` images."""
    predictions, ids = predict_dataset(model, dataset, device, batch_size, precision, show_progress)
    evaluator = CocoEvaluator(dataset.coco_json, label_to_cat_id=dataset.label_to_cat_id)
    evaluator.update(predictions, ids)
    metrics = evaluator.compute()
    if overlay_dir is not None:
        save_overlays(dataset, predictions, Path(overlay_dir), num_overlays)
    return metrics


def save_overlays(
    dataset: CocoDataset,
    predictions: list[dict[str, torch.Tensor]],
    out_dir: Path,
    count: int,
    score_thresh: float = 0.5,
) -> list[Path]:
    """``<image_id>.png``: ground truth left, predictions above ``score_thresh`` right."""
    paths = []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        pred = predictions[i]
        keep = pred["scores"] >= score_thresh
        names = dataset.class_names
        gt = draw_instances(image, target["boxes"], target["labels"], None, target["masks"], names)
        dt = draw_instances(
            image,
            pred["boxes"][keep],
            pred["labels"][keep],
            pred["scores"][keep],
            pred["masks"][keep],
            names,
        )
        paths.append(save_overlay(side_by_side(gt, dt), out_dir / f"{target['image_id']}.png"))
    return paths
