"""COCO evaluation: ground truth scores AP 1, numbers equal raw pycocotools, edge cases."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maskrcnn.engine.coco_metrics import CocoEvaluator, category_names, resolve_backend
from maskrcnn.engine.coco_results import prediction_to_coco

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BACKENDS = ["faster_coco_eval", "pycocotools"]
LABEL_TO_CAT = {1: 3, 2: 7, 3: 11}
CAT_TO_LABEL = {c: lab for lab, c in LABEL_TO_CAT.items()}
STAT_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"]


def _rect(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def _compressed_rle(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8, order="F")
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(mask)
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(height: int, width: int, y0: int, y1: int, x0: int, x1: int) -> dict:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[y0:y1, x0:x1] = 1
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [2]])))  # run starts
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    assert sum(counts) == height * width
    return {"size": [height, width], "counts": counts}


def _complete(ann: dict, height: int, width: int) -> dict:
    segm = ann["segmentation"]
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    ann["area"] = float(mask_utils.area(rle))
    ann["bbox"] = mask_utils.toBbox(rle).tolist()
    return ann


def make_coco_gt() -> dict[str, Any]:
    """Polygons (several parts), both RLE kinds, a crowd region, an empty image, odd cat ids."""
    images = [
        {"id": 1, "file_name": "a.jpg", "height": 64, "width": 80},
        {"id": 2, "file_name": "b.jpg", "height": 48, "width": 48},
        {"id": 5, "file_name": "empty.jpg", "height": 32, "width": 40},
        {"id": 9, "file_name": "big.jpg", "height": 128, "width": 128},
    ]
    anns = [
        _complete(
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [_rect(2, 2, 10, 10), _rect(20, 4, 6, 14)],
            },
            64,
            80,
        ),
        _complete(
            {
                "id": 2,
                "image_id": 1,
                "category_id": 7,
                "iscrowd": 0,
                "segmentation": [[40, 10, 70, 12, 55, 40]],
            },
            64,
            80,
        ),
        _complete(
            {
                "id": 3,
                "image_id": 1,
                "category_id": 3,
                "iscrowd": 1,
                "segmentation": _uncompressed_rle(64, 80, 44, 62, 2, 40),
            },
            64,
            80,
        ),
        {
            "id": 4,
            "image_id": 2,
            "category_id": 11,
            "iscrowd": 0,  # no area, no bbox
            "segmentation": _compressed_rle(48, 48, 5, 30, 8, 20),
        },
        _complete(
            {
                "id": 5,
                "image_id": 2,
                "category_id": 7,  # no iscrowd
                "segmentation": [_rect(25, 25, 20, 18), _rect(30, 2, 5, 5)],
            },
            48,
            48,
        ),
        _complete(
            {
                "id": 6,
                "image_id": 9,
                "category_id": 3,
                "iscrowd": 0,
                "segmentation": [_rect(10, 8, 110, 105)],
            },
            128,
            128,
        ),
    ]
    categories = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]
    return {"images": images, "annotations": anns, "categories": categories}


@pytest.fixture
def coco_gt() -> dict[str, Any]:
    return make_coco_gt()


def _gt_instances(coco_gt: dict) -> dict[int, list[tuple[np.ndarray, list[float], int]]]:
    """image id → [(mask (H, W) uint8, bbox xywh, category id)] for non-crowd objects."""
    api = COCO()
    api.dataset = copy.deepcopy(coco_gt)
    api.createIndex()
    out: dict[int, list] = {img["id"]: [] for img in coco_gt["images"]}
    for ann in api.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        rle = api.annToRLE(ann)
        out[ann["image_id"]].append(
            (api.annToMask(ann), mask_utils.toBbox(rle).tolist(), ann["category_id"])
        )
    return out


def _prediction(
    masks: np.ndarray,
    boxes_xywh: np.ndarray,
    cats: list[int],
    scores: np.ndarray,
    height: int,
    width: int,
) -> dict[str, torch.Tensor]:
    boxes = torch.as_tensor(boxes_xywh, dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {
        "boxes": boxes,
        "labels": torch.tensor([CAT_TO_LABEL[c] for c in cats], dtype=torch.int64),
        "scores": torch.as_tensor(scores, dtype=torch.float32),
        "masks": torch.as_tensor(masks, dtype=torch.float32).reshape(-1, 1, height, width),
    }


def _perfect_predictions(coco_gt: dict) -> tuple[list[dict], list[int]]:
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco_gt["images"]}
    preds, ids = [], []
    for image_id, instances in _gt_instances(coco_gt).items():
        h, w = sizes[image_id]
        masks = np.array([m for m, _, _ in instances], dtype=np.float32).reshape(-1, h, w)
        boxes = np.array([b for _, b, _ in instances]).reshape(-1, 4)
        cats = [c for _, _, c in instances]
        # Probabilities around the 0.5 threshold: binarisation must give back the GT mask.
        pred = _prediction(masks * 0.4 + 0.3, boxes, cats, np.ones(len(cats)), h, w)
        preds.append(pred)
        ids.append(image_id)
    return preds, ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_ground_truth_as_predictions_scores_ap_one(coco_gt: dict, backend: str) -> None:
    preds, ids = _perfect_predictions(coco_gt)
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT, backend=backend)
    evaluator.update(preds[:2], ids[:2])
    evaluator.update(preds[2:], ids[2:])
    metrics = evaluator.compute()
    for iou_type in ("bbox", "segm"):
        m = metrics[iou_type]
        # The unpredicted crowd region must not count as a missed object. (pycocotools
        # divides by tp + fp + eps, so a perfect score may come out as 1 - 2e-16.)
        assert [m["AP"], m["AP50"], m["AP75"], m["AR100"]] == pytest.approx([1.0] * 4, abs=1e-12)
        assert m["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": 1.0}, abs=1e-12)


def test_binary_masks_and_path_input(coco_gt: dict, tmp_path: Path) -> None:
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco_gt))
    preds, ids = _perfect_predictions(coco_gt)
    for pred in preds:
        pred["masks"] = (pred["masks"][:, 0] > 0.5).to(torch.uint8)  # (N, H, W) binary
    evaluator = CocoEvaluator(path, iou_types=("segm",), label_to_cat_id=LABEL_TO_CAT)
    evaluator.update(preds, ids)
    assert evaluator.compute()["segm"]["AP"] == pytest.approx(1.0, abs=1e-12)


def _jittered_predictions(coco_gt: dict, seed: int) -> tuple[list[dict], list[int]]:
    rng = np.random.default_rng(seed)
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco_gt["images"]}
    preds, ids = [], []
    for image_id, instances in _gt_instances(coco_gt).items():
        h, w = sizes[image_id]
        masks, boxes, cats = [], [], []
        for mask, box, cat in instances:
            if rng.random() < 0.15:
                continue  # missed object
            shift = rng.integers(-3, 4, size=2)
            masks.append(np.roll(mask, tuple(shift), axis=(0, 1)))
            boxes.append(np.array(box) + rng.normal(0, 1.5, size=4))
            cats.append(cat if rng.random() < 0.8 else int(rng.choice(list(CAT_TO_LABEL))))
        for _ in range(2):  # false positives
            x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
            bw, bh = rng.integers(3, w // 2), rng.integers(3, h // 2)
            blob = np.zeros((h, w), dtype=np.uint8)
            blob[y : y + bh, x : x + bw] = 1
            masks.append(blob)
            boxes.append(np.array([x, y, bw, bh], dtype=float))
            cats.append(int(rng.choice(list(CAT_TO_LABEL))))
        probs = np.clip(
            np.array(masks, dtype=np.float32) * 0.6 + rng.random((len(masks), h, w)) * 0.45, 0, 1
        )
        scores = rng.random(len(masks))
        preds.append(_prediction(probs, np.array(boxes), cats, scores, h, w))
        ids.append(image_id)
    return preds, ids


def _raw_pycocotools_stats(coco_gt: dict, preds: list[dict], ids: list[int]) -> dict[str, list]:
    """Reference: plain pycocotools on results built independently of our converter."""
    bbox_res, segm_res = [], []
    for pred, image_id in zip(preds, ids, strict=True):
        boxes = pred["boxes"].double().numpy()
        masks = (pred["masks"][:, 0] > 0.5).numpy().astype(np.uint8)
        for k in range(len(boxes)):
            x1, y1, x2, y2 = boxes[k]
            common = {
                "image_id": image_id,
                "category_id": LABEL_TO_CAT[int(pred["labels"][k])],
                "score": float(pred["scores"][k]),
            }
            bbox_res.append({**common, "bbox": [x1, y1, x2 - x1, y2 - y1]})
            rle = mask_utils.encode(np.asfortranarray(masks[k]))
            segm_res.append({**common, "segmentation": rle})
    stats = {}
    for iou_type, res in (("bbox", bbox_res), ("segm", segm_res)):
        gt = COCO()
        gt.dataset = copy.deepcopy(coco_gt)
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(res), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        stats[iou_type] = list(coco_eval.stats[:9])
    return stats


def _add_random_images(coco_gt: dict, rng: np.random.Generator, count: int) -> None:
    """Images of 112x128 holding 2-5 quadrilaterals of small, medium and large size."""
    next_ann = max(a["id"] for a in coco_gt["annotations"]) + 1
    for image_id in range(100, 100 + count):
        coco_gt["images"].append(
            {"id": image_id, "file_name": f"{image_id}.jpg", "height": 112, "width": 128}
        )
        for _ in range(rng.integers(2, 6)):
            side = rng.choice([12, 50, 104])  # area < 32², 32²..96², > 96²
            x, y = rng.integers(0, 128 - side), rng.integers(0, 112 - side)
            quad = (np.array(_rect(x, y, side, side)) + rng.normal(0, 2, 8)).tolist()
            ann = {
                "id": next_ann,
                "image_id": image_id,
                "iscrowd": 0,
                "segmentation": [quad],
                "category_id": int(rng.choice(list(CAT_TO_LABEL))),
            }
            coco_gt["annotations"].append(_complete(ann, 112, 128))
            next_ann += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_numbers_equal_raw_pycocotools(coco_gt: dict, backend: str) -> None:
    sizes = {img["id"]: (img["height"], img["width"]) for img in coco_gt["images"]}
    for ann in coco_gt["annotations"]:  # raw pycocotools needs every field
        ann.setdefault("iscrowd", 0)
        _complete(ann, *sizes[ann["image_id"]])
    _add_random_images(coco_gt, np.random.default_rng(1), count=8)
    preds, ids = _jittered_predictions(coco_gt, seed=0)
    expected = _raw_pycocotools_stats(coco_gt, preds, ids)
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT, backend=backend)
    evaluator.update(preds, ids)
    metrics = evaluator.compute()
    for iou_type in ("bbox", "segm"):
        ours = [metrics[iou_type][name] for name in STAT_NAMES]
        np.testing.assert_allclose(ours, expected[iou_type], atol=1e-6, rtol=0)
        # Imperfect at every size, so the comparison means something.
        assert all(0.05 < metrics[iou_type][k] < 0.95 for k in ("AP", "APs", "APm", "APl"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_predictions_give_zero_ap(coco_gt: dict, backend: str) -> None:
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(0, 1, 64, 80),
    }
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT, backend=backend)
    evaluator.update([empty], [1])
    metrics = evaluator.compute()
    assert metrics["bbox"]["AP"] == 0.0
    assert metrics["segm"]["per_class"] == {"cat": 0.0, "dog": 0.0, "bird": -1.0}
    assert evaluator.results_json() == []


def test_only_updated_images_are_evaluated(coco_gt: dict) -> None:
    preds, ids = _perfect_predictions(coco_gt)
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT)
    evaluator.update(preds[:1], ids[:1])  # image 1 holds cat and dog, no bird
    evaluator.update(preds[:1], ids[:1])  # a repeated image (padding) is skipped
    assert len(evaluator.results_json()) == 2
    per_class = evaluator.compute()["bbox"]["per_class"]
    assert per_class == pytest.approx({"cat": 1.0, "dog": 1.0, "bird": -1.0}, abs=1e-12)


def test_results_json_format(coco_gt: dict) -> None:
    pred = {
        "boxes": torch.tensor([[2.0, 3.0, 12.0, 8.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.5]),
        "masks": torch.zeros(1, 1, 64, 80),
    }
    pred["masks"][0, 0, 3:8, 2:12] = 0.9
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT)
    evaluator.update([pred], [1])
    (result,) = evaluator.results_json()
    assert result["image_id"] == 1 and result["category_id"] == 7 and result["score"] == 0.5
    assert result["bbox"] == [2.0, 3.0, 10.0, 5.0]
    assert mask_utils.area(result["segmentation"]) == 50
    assert isinstance(result["segmentation"]["counts"], str)
    json.dumps(result)


def test_save_writes_metrics_and_curves(coco_gt: dict, tmp_path: Path) -> None:
    preds, ids = _perfect_predictions(coco_gt)
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT)
    evaluator.update(preds, ids)
    metrics = evaluator.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
    for iou_type in ("bbox", "segm"):
        assert (tmp_path / "out" / f"pr_curve_{iou_type}.png").read_bytes()[:4] == b"\x89PNG"


def test_pr_curve_of_perfect_predictions_is_flat_one(coco_gt: dict) -> None:
    from maskrcnn.engine.coco_metrics import pr_curves

    preds, ids = _perfect_predictions(coco_gt)
    evaluator = CocoEvaluator(coco_gt, iou_types=("bbox",), label_to_cat_id=LABEL_TO_CAT)
    evaluator.update(preds, ids)
    evaluator.compute()
    coco_eval = evaluator._evals["bbox"]
    curves = pr_curves(coco_eval.eval["precision"], np.asarray(coco_eval.params.iouThrs))
    for curve in curves.values():
        np.testing.assert_allclose(curve, np.ones(101), atol=1e-12, rtol=0)


def test_quiet_unless_verbose(coco_gt: dict, capsys: pytest.CaptureFixture[str]) -> None:
    for backend in BACKENDS:
        CocoEvaluator(coco_gt, backend=backend, label_to_cat_id=LABEL_TO_CAT).compute()
    assert capsys.readouterr().out == ""
    CocoEvaluator(coco_gt, backend="pycocotools", verbose=True).compute()
    assert "Average Precision" in capsys.readouterr().out


def test_bad_inputs_raise(coco_gt: dict) -> None:
    with pytest.raises(ValueError, match="valid backends"):
        CocoEvaluator(coco_gt, backend="detectron")
    with pytest.raises(ValueError, match="keypoints"):
        CocoEvaluator(coco_gt, iou_types=("keypoints",))
    evaluator = CocoEvaluator(coco_gt, label_to_cat_id=LABEL_TO_CAT)
    pred = {
        "boxes": torch.zeros(1, 4),
        "labels": torch.tensor([1]),
        "scores": torch.ones(1),
        "masks": torch.zeros(1, 1, 10, 10),
    }
    with pytest.raises(ValueError, match="masks are 10x10"):
        evaluator.update([pred], [1])
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluator.update([pred], [404])
    with pytest.raises(ValueError, match=r"labels \[9\]"):
        evaluator.update([{**pred, "labels": torch.tensor([9])}], [1])
    # Results converted elsewhere (gathered from other processes) get the same checks: a
    # resized image's masks would otherwise score an AP of 0 without a word.
    results = prediction_to_coco(pred, 1, LABEL_TO_CAT)
    with pytest.raises(ValueError, match="masks are 10x10"):
        evaluator.add_results(results, [1])
    with pytest.raises(ValueError, match=r"image ids \[404\] are not in the ground truth"):
        evaluator.add_results([], [1, 404])


def test_box_only_annotations_get_their_area_from_the_box() -> None:
    gt = {"images": [{"id": 1, "height": 40, "width": 50}],
          "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 20, 15]}]}
    evaluator = CocoEvaluator(gt, iou_types=("bbox",))
    box = {"boxes": torch.tensor([[5.0, 5, 25, 20]]), "labels": torch.tensor([1]),
           "scores": torch.ones(1)}
    evaluator.update([box], [1])
    assert evaluator.compute()["bbox"]["AP"] == pytest.approx(1.0)


def test_falls_back_to_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises
    with pytest.warns(UserWarning, match="pycocotools"):
        assert resolve_backend("faster_coco_eval") == "pycocotools"


def test_repeatedcategory_names_are_disambiguated() -> None:
    cats = [{"id": 1, "name": "facade"}, {"id": 2, "name": "facade"}, {"id": 3, "name": "door"}]
    assert category_names(cats) == {1: "facade#1", 2: "facade#2", 3: "door"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_segm_size_range_uses_mask_area(backend: str) -> None:
    """A false positive whose mask is small (a diagonal line) but whose box is medium sized."""
    gt = {
        "images": [{"id": 1, "file_name": "x.jpg", "height": 64, "width": 64}],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [
            _complete(
                {
                    "id": 1,
                    "image_id": 1,
                    "category_id": 1,
                    "iscrowd": 0,
                    "segmentation": [_rect(5, 5, 10, 10)],
                },
                64,
                64,
            )
        ],
    }
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 5:15, 5:15] = 1
    masks[1, torch.arange(20, 60), torch.arange(20, 60)] = 1  # area 40, box 40x40
    pred = {
        "boxes": torch.tensor([[5.0, 5, 15, 15], [20, 20, 60, 60]]),
        "labels": torch.tensor([1, 1]),
        "scores": torch.tensor([0.5, 0.9]),
        "masks": masks,
    }
    evaluator = CocoEvaluator(gt, iou_types=("segm",), backend=backend)
    evaluator.update([pred], [1])
    segm = evaluator.compute()["segm"]
    # The higher-scored false positive counts against small objects: precision 1/2 throughout.
    assert segm["APs"] == pytest.approx(0.5, abs=1e-12)
    assert segm["APm"] == -1.0


def test_documented_example_runs() -> None:
    doc = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
    (block,) = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    namespace: dict[str, Any] = {}
    exec(compile(block, str(doc), "exec"), namespace)
    assert namespace["metrics"]["segm"]["per_class"] == {"window": 1.0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_annotation_id_zero_is_matched_like_any_other(coco_gt: dict, backend: str) -> None:
    """Roboflow's exports number annotations from 0; pycocotools reads a match with id 0 as
    no match, which would make a perfect detection a false positive."""
    renumbered = copy.deepcopy(coco_gt)
    for ann in renumbered["annotations"]:
        ann["id"] -= min(a["id"] for a in coco_gt["annotations"])
    assert min(a["id"] for a in renumbered["annotations"]) == 0
    preds, ids = _perfect_predictions(coco_gt)
    evaluator = CocoEvaluator(renumbered, label_to_cat_id=LABEL_TO_CAT, backend=backend)
    evaluator.update(preds, ids)
    for iou_type, m in evaluator.compute().items():
        assert [m["AP"], m["AR100"]] == pytest.approx([1.0, 1.0], abs=1e-12), iou_type
