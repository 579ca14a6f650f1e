"""Evaluation of a model on a COCO dataset: AP, and overlays of a few images. With several
processes each predicts its share of the images and the main one computes the metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.loader import build_loader
from maskrcnn.engine.batches import training_loader
from maskrcnn.engine.coco_metrics import CocoEvaluator
from maskrcnn.engine.coco_results import prediction_to_coco
from maskrcnn.engine.distributed import DistInfo, gather_objects
from maskrcnn.utils.precision import autocast
from maskrcnn.utils.visualize import draw_instances, save_overlay, side_by_side

log = logging.getLogger("maskrcnn")


@torch.no_grad()
def predict_dataset(
    model: torch.nn.Module, dataset: CocoDataset, device: torch.device, batch_size: int = 2,
    precision: str = "fp32", show_progress: bool = False, dist: DistInfo | None = None,
    skip_bad: bool = False, keep: int = 0,
) -> tuple[list[dict[str, Any]], list[int], dict[int, dict[str, torch.Tensor]]]:
    """COCO results (masks as RLE) for this process's share of ``dataset`` (all of it for
    one process), in order, with their image ids, and the full predictions (on the CPU) of
    its first ``keep`` images by id. Each batch's masks are encoded as it comes: full-size
    float masks of every image would take gigabytes (100 detections of a 1024² image are
    400 MB). With ``skip_bad`` an image that cannot be read is reported and left out (its
    id is not returned, so it is not scored)."""
    dist = dist or DistInfo()
    model.eval()
    loader = build_loader(dataset, batch_size, shuffle=False, num_workers=0,
                          aspect_ratio_grouping=False, distributed=dist.enabled,
                          num_replicas=dist.world_size, rank=dist.rank)
    results: list[dict[str, Any]] = []
    ids: list[int] = []
    kept: dict[int, dict[str, torch.Tensor]] = {}
    with tqdm(training_loader(loader, 0, skip_bad), desc="eval", disable=not show_progress,
              leave=False) as batches:
        for images, targets, bad in batches:
            for sample in bad:
                log.warning("skipped validation image id %d: %s",
                            dataset.image_ids[sample.index], sample.message)
            if not images:
                continue
            with autocast(precision, device):
                out = model([im.to(device) for im in images])
            for o, t in zip(out, targets, strict=True):
                pred = {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                        for k, v in o.items()}
                image_id = int(t["image_id"])
                results += prediction_to_coco(pred, image_id, dataset.label_to_cat_id)
                ids.append(image_id)
                if len(kept) < keep:
                    kept[image_id] = pred
    return results, ids, kept


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module, dataset: CocoDataset, device: torch.device, batch_size: int = 2,
    precision: str = "fp32", dist: DistInfo | None = None, skip_bad: bool = False,
) -> dict[str, float]:
    """The mean of each training loss, and of their sum (``loss``), over ``dataset``: the
    model computes its losses as in training (proposals sampled, multi-scale sizes drawn)
    but with every norm layer in eval mode (running statistics used, not updated) and its
    random draws from a fixed seed (the CPU generator and this process's CUDA generator,
    forked and restored after), so that training's own stream is untouched and two
    evaluations of the same weights give the same figure. Each batch's losses weighted by
    its number of images, across processes too (a distributed sampler's padding images
    count twice)."""
    dist = dist or DistInfo()
    was_training = model.training
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase):
            module.eval()
    loader = build_loader(dataset, batch_size, shuffle=False, num_workers=0,
                          aspect_ratio_grouping=False, distributed=dist.enabled,
                          num_replicas=dist.world_size, rank=dist.rank)
    sums: dict[str, float] = {}
    count = 0
    cuda = device.type == "cuda"
    index = 0
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        # Only the generators the model draws from, forked and seeded alone.
        with torch.random.fork_rng(devices=[index] if cuda else []):
            torch.default_generator.manual_seed(0)
            if cuda:
                torch.cuda.default_generators[index].manual_seed(0)
            for images, targets, _ in training_loader(loader, 0, skip_bad):
                if not images:
                    continue
                with autocast(precision, device):
                    losses = model(
                        [im.to(device) for im in images],
                        [{k: v.to(device) if isinstance(v, torch.Tensor) else v
                          for k, v in t.items()} for t in targets],
                    )
                assert isinstance(losses, dict)
                n = len(images)
                for name, value in {**losses, "loss": sum(losses.values())}.items():
                    sums[name] = sums.get(name, 0.0) + float(value) * n
                count += n
    finally:
        model.train(was_training)
    parts = gather_objects((sums, count), dist)
    total = sum(c for _, c in parts)
    names = sorted({name for s, _ in parts for name in s})
    return {name: sum(s.get(name, 0.0) for s, _ in parts) / max(total, 1) for name in names}


def evaluate(
    model: torch.nn.Module, dataset: CocoDataset, device: torch.device, batch_size: int = 2,
    precision: str = "fp32", overlay_dir: str | Path | None = None, num_overlays: int = 4,
    show_progress: bool = False, dist: DistInfo | None = None, skip_bad: bool = False,
) -> dict[str, Any]:
    """COCO bbox and segm metrics of ``model`` on ``dataset`` (every process gets them);
    with ``overlay_dir``, the main process saves ground truth and prediction side by side
    for its first ``num_overlays`` images. ``skip_bad``: see :func:`predict_dataset`."""
    dist = dist or DistInfo()
    keep = num_overlays if overlay_dir is not None and dist.is_main else 0
    results, ids, kept = predict_dataset(model, dataset, device, batch_size, precision,
                                         show_progress, dist, skip_bad, keep)
    gathered = gather_objects((results, ids), dist)
    evaluator = CocoEvaluator(dataset.coco_json, label_to_cat_id=dataset.label_to_cat_id)
    for part_results, part_ids in gathered:
        evaluator.add_results(part_results, part_ids)
    metrics = evaluator.compute()
    if overlay_dir is not None and dist.is_main:
        save_overlays(dataset, kept, Path(overlay_dir), num_overlays)
    return metrics


def save_overlays(dataset: CocoDataset, predictions: dict[int, dict[str, torch.Tensor]],
                  out_dir: Path, count: int, score_thresh: float = 0.5) -> list[Path]:
    """``<image_id>.png``: ground truth left, predictions above ``score_thresh`` right, for
    the first ``count`` images of ``dataset`` that have predictions."""
    paths: list[Path] = []
    names = dataset.class_names
    for i, image_id in enumerate(dataset.image_ids):
        if len(paths) >= count:
            break
        if image_id not in predictions:
            continue
        image, target = dataset[i]
        # A validation pipeline with ``normalize`` gives values outside [0, 1]: draw the
        # visible range.
        image = image.as_subclass(torch.Tensor).clamp(0, 1)
        pred = predictions[image_id]
        keep = pred["scores"] >= score_thresh
        gt = draw_instances(image, target["boxes"], target["labels"], None, target["masks"],
                            names, min_side=384)
        dt = draw_instances(image, pred["boxes"][keep], pred["labels"][keep],
                            pred["scores"][keep], pred["masks"][keep], names, min_side=384)
        paths.append(save_overlay(side_by_side(gt, dt), out_dir / f"{image_id}.png"))
    return paths
