"""COCO bbox and segm evaluation of torchvision-format predictions.

The numbers come from COCOeval's accumulated ``eval["precision"]`` / ``eval["recall"]`` arrays,
reduced exactly as ``COCOeval.summarize`` reduces them, so they equal pycocotools' stats.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from maskrcnn.engine.coco_results import prediction_to_coco
from maskrcnn.utils.atomic import write_text_atomic

IOU_TYPES = ("bbox", "segm")
BACKENDS = ("faster_coco_eval", "pycocotools")
# (metric name, ap=True / ar=False, IoU threshold or None for .50:.95, area label, max dets)
SUMMARY: tuple[tuple[str, bool, float | None, str, int], ...] = (
    ("AP", True, None, "all", 100),
    ("AP50", True, 0.5, "all", 100),
    ("AP75", True, 0.75, "all", 100),
    ("APs", True, None, "small", 100),
    ("APm", True, None, "medium", 100),
    ("APl", True, None, "large", 100),
    ("AR1", False, None, "all", 1),
    ("AR10", False, None, "all", 10),
    ("AR100", False, None, "all", 100),
)


def resolve_backend(backend: str) -> str:
    """Validates ``backend``; falls back to pycocotools when faster-coco-eval is not installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {list(BACKENDS)}")
    if backend == "faster_coco_eval":
        try:
            import faster_coco_eval  # noqa: F401
        except ImportError:
            warnings.warn("faster-coco-eval is not installed; using pycocotools", stacklevel=2)
            return "pycocotools"
    return backend


def load_ground_truth(coco_gt: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """A private copy of the COCO dict; ``iscrowd``, ``area`` and ``bbox`` filled where absent,
    annotation ids renumbered 1..N (see below)."""
    if isinstance(coco_gt, (str, Path)):
        with Path(coco_gt).open("rb") as f:
            data: dict[str, Any] = json.load(f)
    else:
        data = copy.deepcopy(dict(coco_gt))
    images = {img["id"]: img for img in data["images"]}
    for ann in data.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        if "area" in ann and "bbox" in ann:
            continue
        if not ann.get("segmentation") and "bbox" in ann:  # a box-only annotation
            ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
            continue
        img = images[ann["image_id"]]
        rle = to_rle(ann["segmentation"], img["height"], img["width"])
        ann.setdefault("area", float(mask_utils.area(rle)))
        ann.setdefault("bbox", [float(v) for v in mask_utils.toBbox(rle)])
    data.setdefault("annotations", [])
    # pycocotools marks a detection matched by storing the annotation's id, 0 meaning
    # unmatched: a match with annotation id 0 (Roboflow's exports start there) would count as
    # a false positive. Results never name annotation ids, so they are renumbered from 1.
    for number, ann in enumerate(data["annotations"], start=1):
        ann["id"] = number
    return data


def to_rle(segm: Any, height: int, width: int) -> Any:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as compressed RLE, as
    pycocotools reads the ground truth."""
    if isinstance(segm, list):
        return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    if isinstance(segm["counts"], list):
        return mask_utils.frPyObjects(segm, height, width)
    return segm


def _quiet(verbose: bool) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def _coco_api(backend: str, data: dict[str, Any]) -> Any:
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO
    else:
        from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    return coco


def run_cocoeval(
    gt: dict[str, Any],
    results: list[dict[str, Any]],
    iou_type: str,
    image_ids: Sequence[int],
    backend: str,
    verbose: bool = False,
) -> Any:
    """Runs COCOeval (evaluate + accumulate) and returns the COCOeval object.

    gt: a COCO dict (copied here: COCOeval writes into its annotations); results: COCO results
    dicts; image_ids: the images evaluated (images without results count as missed objects).
    """
    with _quiet(verbose):
        coco_gt = _coco_api(backend, copy.deepcopy(gt))
        if results:
            coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        else:  # loadRes cannot take an empty list in pycocotools
            empty = {"images": gt["images"], "categories": gt["categories"], "annotations": []}
            coco_dt = _coco_api(backend, empty)
        if backend == "faster_coco_eval":
            from faster_coco_eval import COCOeval_faster

            printer = print if verbose else _ignore
            coco_eval = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=printer)
        else:
            from pycocotools.cocoeval import COCOeval

            coco_eval = COCOeval(coco_gt, coco_dt, iou_type)
        coco_eval.params.imgIds = sorted(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        if verbose:
            coco_eval.summarize()
    return coco_eval


def _ignore(*args: Any, **kwargs: Any) -> None:
    del args, kwargs


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def summarize(coco_eval: Any, category_names: Mapping[int, str]) -> dict[str, Any]:
    """The standard 12-number COCO summary (9 of them) and per-class AP, from ``coco_eval.eval``.

    precision: (T iou thresholds, R recall points, K classes, A areas, M max-dets); recall:
    (T, K, A, M). Entries of -1 (no ground truth) are left out of the means, as in COCO.
    """
    p = coco_eval.params
    precision, recall = coco_eval.eval["precision"], coco_eval.eval["recall"]
    out: dict[str, Any] = {}
    for name, is_ap, iou, area, max_dets in SUMMARY:
        a, m = p.areaRngLbl.index(area), list(p.maxDets).index(max_dets)
        values = precision[..., a, m] if is_ap else recall[..., a, m]
        if iou is not None:
            values = values[np.isclose(p.iouThrs, iou)]
        out[name] = _mean_valid(values)
    a, m = p.areaRngLbl.index("all"), list(p.maxDets).index(100)
    out["per_class"] = {
        category_names[cat_id]: _mean_valid(precision[:, :, k, a, m])
        for k, cat_id in enumerate(p.catIds)
    }
    return out


def category_names(categories: list[dict[str, Any]]) -> dict[int, str]:
    """Category id → name; a name used by several categories gets ``#<id>`` appended."""
    counts: dict[str, int] = {}
    for cat in categories:
        counts[cat["name"]] = counts.get(cat["name"], 0) + 1
    return {
        cat["id"]: cat["name"] if counts[cat["name"]] == 1 else f"{cat['name']}#{cat['id']}"
        for cat in categories
    }


def _class_average(precision: np.ndarray) -> np.ndarray:
    """precision: (T, R, K) → (R,) mean over thresholds and classes of the defined entries."""
    valid = precision > -1
    sums = np.where(valid, precision, 0.0).sum(axis=(0, 2))
    counts = valid.sum(axis=(0, 2))
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def pr_curves(precision: np.ndarray, iou_thrs: np.ndarray) -> dict[str, np.ndarray]:
    """Class-averaged precision per recall point (area all, most detections).

    precision: COCOeval's (T, R, K, A, M) array. Returns label → (R,) curve for IoU 0.50,
    IoU 0.75 and the average over all thresholds; NaN where no class is defined.
    """
    per_iou = precision[:, :, :, 0, -1]  # (T, R, K)
    t50, t75 = (int(np.argmin(np.abs(iou_thrs - iou))) for iou in (0.5, 0.75))
    return {
        "IoU=0.50": _class_average(per_iou[t50 : t50 + 1]),
        "IoU=0.75": _class_average(per_iou[t75 : t75 + 1]),
        "IoU=0.50:0.95": _class_average(per_iou),
    }


def plot_pr_curves(
    curves: Mapping[str, np.ndarray], rec_thrs: np.ndarray, title: str, path: Path
) -> None:
    """Writes a precision-recall PNG (matplotlib's object API with Agg; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, curve in curves.items():
        ax.plot(rec_thrs, curve, label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.05), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left")
    fig.savefig(path)


class CocoEvaluator:
    """Accumulates predictions over a dataset and computes COCO bbox / segm metrics.

    coco_gt: COCO dict or path to its JSON (crowd regions keep ``iscrowd=1`` and are handled as
    COCO does); label_to_cat_id: contiguous model label → COCO category id (None: identity);
    backend: ``"faster_coco_eval"`` (default) or ``"pycocotools"``.
    """

    def __init__(
        self,
        coco_gt: Mapping[str, Any] | str | Path,
        iou_types: Sequence[str] = IOU_TYPES,
        label_to_cat_id: Mapping[int, int] | None = None,
        backend: str = "faster_coco_eval",
        verbose: bool = False,
    ) -> None:
        unknown = sorted(set(iou_types) - set(IOU_TYPES))
        if unknown:
            raise ValueError(f"unknown iou types {unknown}; valid: {list(IOU_TYPES)}")
        self.gt = load_ground_truth(coco_gt)
        self.iou_types = tuple(iou_types)
        self.label_to_cat_id = dict(label_to_cat_id) if label_to_cat_id is not None else None
        self.backend = resolve_backend(backend)
        self.verbose = verbose
        self._image_sizes = {img["id"]: (img["height"], img["width"]) for img in self.gt["images"]}
        self._results: list[dict[str, Any]] = []
        self._image_ids: list[int] = []
        self._evals: dict[str, Any] = {}
        self._metrics: dict[str, Any] | None = None

    def update(
        self, predictions: Sequence[Mapping[str, Any]], image_ids: Sequence[int]
    ) -> None:
        """Adds one batch: ``predictions[i]`` (torchvision output dict; its ``masks`` may be
        box-local :class:`~maskrcnn.structures.local_masks.LocalMasks`) is for
        ``image_ids[i]``.

        An image already seen is skipped (DistributedSampler pads with repeated images).
        """
        if len(predictions) != len(image_ids):
            raise ValueError(f"{len(predictions)} predictions for {len(image_ids)} image ids")
        seen = set(self._image_ids)
        for prediction, image_id in zip(predictions, image_ids, strict=True):
            image_id = int(image_id)
            if image_id not in self._image_sizes:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            if image_id in seen:
                continue
            seen.add(image_id)
            results = prediction_to_coco(
                prediction, image_id, self.label_to_cat_id, with_masks="segm" in self.iou_types
            )
            self._check_mask_sizes(results)
            self._results.extend(results)
            self._image_ids.append(image_id)
        self._metrics = None

    def _check_mask_sizes(self, results: Sequence[dict[str, Any]]) -> None:
        """Masks must be at their ground-truth image's size (predictions of a resized image
        would be scored against the original's objects, and give a wrong AP)."""
        for r in results:
            if "segmentation" not in r:
                continue
            size, expected = list(r["segmentation"]["size"]), list(self._image_sizes[r["image_id"]])
            if size != expected:
                raise ValueError(
                    f"image {r['image_id']}: masks are {size[0]}x{size[1]}, "
                    f"the ground-truth image is {expected[0]}x{expected[1]}"
                )

    def add_results(self, results: Sequence[dict[str, Any]], image_ids: Sequence[int]) -> None:
        """Adds COCO results already converted (e.g. gathered from other processes) for
        ``image_ids``; results of an image already seen are ignored."""
        unknown = [int(i) for i in image_ids if int(i) not in self._image_sizes]
        if unknown:
            raise ValueError(f"image ids {unknown[:5]} are not in the ground truth")
        seen = set(self._image_ids)
        fresh = [int(i) for i in dict.fromkeys(image_ids) if int(i) not in seen]
        keep = set(fresh)
        kept = [r for r in results if r["image_id"] in keep]
        self._check_mask_sizes(kept)
        self._results.extend(kept)
        self._image_ids.extend(fresh)
        self._metrics = None

    def evaluated_image_ids(self) -> list[int]:
        """The images the metrics are computed on: those passed to ``update``, else all."""
        return list(self._image_ids or self._image_sizes)

    def results_json(self) -> list[dict[str, Any]]:
        """The accumulated COCO results (bbox and, with segm, an RLE ``segmentation``)."""
        return copy.deepcopy(self._results)

    def _results_for(self, iou_type: str) -> Iterator[dict[str, Any]]:
        # One geometry per evaluation, as torchvision and detectron2 do: with both present,
        # loadRes would take a segm result's area from its box, not its mask.
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        for result in self._results:
            yield {k: v for k, v in result.items() if k != drop}

    def compute(self) -> dict[str, Any]:
        """Metrics per iou type: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, per_class.

        Values lie in [0, 1]; -1 where COCO finds them undefined (no ground truth in that
        range). Only the images passed to ``update`` are evaluated (all, if none were).
        """
        image_ids = self.evaluated_image_ids()
        names = category_names(self.gt["categories"])
        metrics: dict[str, Any] = {}
        for iou_type in self.iou_types:
            results = list(self._results_for(iou_type))
            coco_eval = run_cocoeval(
                self.gt, results, iou_type, image_ids, self.backend, self.verbose
            )
            self._evals[iou_type] = coco_eval
            metrics[iou_type] = summarize(coco_eval, names)
        self._metrics = metrics
        return metrics

    def save(
        self, directory: str | Path, skipped: Mapping[int, str] | None = None
    ) -> dict[str, Any]:
        """Writes ``metrics.json`` and ``pr_curve_<iou_type>.png``; returns the metrics.
        ``skipped``: image id → why, for images left out of the evaluation (listed in the
        file as ``skipped_images``, so that its AP is never taken for the whole set's)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        metrics = self._metrics if self._metrics is not None else self.compute()
        written = dict(metrics)
        if skipped:
            written["skipped_images"] = [
                {"image_id": image_id, "reason": reason} for image_id, reason in skipped.items()
            ]
        write_text_atomic(directory / "metrics.json", json.dumps(written, indent=2))
        for iou_type in self.iou_types:
            coco_eval = self._evals[iou_type]
            curves = pr_curves(coco_eval.eval["precision"], np.asarray(coco_eval.params.iouThrs))
            title = f"{iou_type}  AP={metrics[iou_type]['AP']:.3f}"
            path = directory / f"pr_curve_{iou_type}.png"
            plot_pr_curves(curves, np.asarray(coco_eval.params.recThrs), title, path)
        return metrics
