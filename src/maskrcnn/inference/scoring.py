"""A :class:`Predictor` scored on a COCO dataset (``maskrcnn eval``, with its TTA and fast
variants): the images read in batches (unreadable ones reported and left out), the model's
labels matched to the dataset's categories, COCO AP by the evaluator of training, the model's
time per image. Training's own evaluation pass, on the model and its loader, is
``engine/evaluation.py``."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator

from torch import Tensor
from tqdm import tqdm

from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.image_input import to_float_image
from maskrcnn.engine.coco_metrics import CocoEvaluator
from maskrcnn.inference.predictor import Predictor


def dataset_batches(
    dataset: CocoDataset, batch_size: int, skipped: dict[int, str], desc: str
) -> Iterator[tuple[list[int], list[Tensor]]]:
    """(image ids, (3, H, W) uint8 images) of ``dataset``; unreadable images are recorded in
    ``skipped`` (image id → reason), reported once, and left out."""
    ids: list[int] = []
    images: list[Tensor] = []
    for index in tqdm(range(len(dataset)), desc=desc, unit="img"):
        try:
            image, target = dataset[index]
        except DatasetError as err:
            if dataset.image_ids[index] not in skipped:
                tqdm.write(f"skipped {err}", file=sys.stderr)
            skipped[dataset.image_ids[index]] = str(err)
            continue
        ids.append(int(target["image_id"]))
        images.append(image)
        if len(ids) == batch_size:
            yield ids, images
            ids, images = [], []
    if ids:
        yield ids, images


def match_categories(predictor: Predictor, dataset: CocoDataset) -> dict[int, int]:
    """The dataset's category id of each of the model's labels. The checkpoint's categories
    (name and id per label) are the dataset's, or the same names under other ids (then they
    are matched by name, saying so); anything else is a ValueError listing both, since the
    scores would otherwise be computed against the wrong classes."""
    ours = dict(zip(dataset.class_names[1:], dataset.label_to_cat_id.values(), strict=True))
    names, ids = predictor.class_names, predictor.label_to_cat_id
    if names is None or ids is None:  # a checkpoint that does not say: trust the dataset
        if predictor.model.cfg.num_classes != len(dataset.class_names):
            raise ValueError(
                f"the model predicts {predictor.model.cfg.num_classes - 1} classes but "
                f"{dataset.ann_file} has {len(dataset.class_names) - 1} categories"
            )
        return dict(dataset.label_to_cat_id)
    theirs = {names[label]: cat for label, cat in ids.items()}
    if theirs == ours:
        return dict(ids)
    if set(theirs) == set(ours):
        print(f"warning: {dataset.ann_file}: category ids differ from the checkpoint's; "
              "matched by name", file=sys.stderr)
        return {label: ours[names[label]] for label in ids}
    raise ValueError(
        f"{dataset.ann_file}: its categories {sorted(ours.items(), key=lambda x: x[1])} are "
        f"not the checkpoint's {sorted(theirs.items(), key=lambda x: x[1])} (name, id); "
        "evaluate on data annotated with the model's classes"
    )


def evaluate_predictor(
    predictor: Predictor,
    dataset: CocoDataset,
    batch_size: int,
    skipped: dict[int, str],
    label_map: dict[int, int],
    desc: str = "eval",
) -> tuple[CocoEvaluator, float, int]:
    """A CocoEvaluator fed with the predictor's output on ``dataset`` (its labels mapped to
    the dataset's category ids by ``label_map``, see :func:`match_categories`), the model's
    seconds per image, and the number of images evaluated."""
    evaluator = CocoEvaluator(dataset.coco_json, label_to_cat_id=label_map)
    seconds, done = 0.0, 0
    for ids, images in dataset_batches(dataset, batch_size, skipped, desc):
        start = time.perf_counter()
        # Sliced prediction takes the uint8 image and converts tile by tile.
        tiled = predictor.tile is not None
        preds = predictor.predict_batch([im if tiled else to_float_image(im) for im in images])
        seconds += time.perf_counter() - start
        fields = [{"boxes": p.boxes, "labels": p.labels, "scores": p.scores, "masks": p.masks}
                  for p in preds]
        evaluator.update(fields, ids)
        done += len(ids)
    return evaluator, seconds / max(done, 1), done
