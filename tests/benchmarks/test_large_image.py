"""The large-image benchmark's counts: objects found twice, pieces, and objects split at a
tile border, on hand-made predictions."""

from __future__ import annotations

from typing import Any

import torch
from pycocotools import mask as mask_utils

from bench_scripts import load_benchmark
from maskrcnn.inference.sliced import Candidates
from maskrcnn.structures.detections import Detections
from maskrcnn.structures.local_masks import LocalMasks


def _load() -> Any:
    return load_benchmark("large_image")


def _rle(x0: int, y0: int, x1: int, y1: int) -> dict[str, Any]:
    mask = torch.zeros((200, 200), dtype=torch.uint8)
    mask[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(mask.numpy().copy(order="F"))
    rle["counts"] = rle["counts"].decode()
    return rle


def _pred(box: tuple[int, int, int, int], score: float = 0.9) -> dict[str, Any]:
    x0, y0, x1, y1 = box
    return {"image_id": 1, "category_id": 1, "score": score, "segmentation": _rle(*box),
            "bbox": [x0, y0, x1 - x0, y1 - y0]}


def test_an_object_with_a_piece_made_from_cut_detections_is_a_split() -> None:
    bench = _load()
    obj = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(100, 20, 150, 60),
           "area": 2000.0, "bbox": [100, 20, 50, 40], "iscrowd": 0}
    truth = {"images": [{"id": 1, "width": 200, "height": 200}],
             "categories": [{"id": 1, "name": "a"}], "annotations": [obj]}
    whole = _pred((100, 20, 150, 60))
    cut = {**_pred((100, 20, 128, 60), 0.8), "from_cut": True}  # the left part, cut at x 128
    inner = _pred((110, 30, 125, 50), 0.7)  # a piece some tile saw whole: the model's own
    got = bench.scores(truth, [whole, cut])
    assert (got["duplicated_objects"], got["pieces"], got["split_objects"]) == (1, 0, 1)
    got = bench.scores(truth, [whole, inner])
    assert (got["duplicated_objects"], got["pieces"], got["split_objects"]) == (0, 1, 0)
    got = bench.scores(truth, [whole, {**inner, "from_cut": True}])
    assert (got["duplicated_objects"], got["pieces"], got["split_objects"]) == (0, 1, 1)
    assert bench.scores(truth, [{**whole, "from_cut": True}])["split_objects"] == 0


def test_a_result_is_from_cut_detections_unless_a_tile_saw_it_whole() -> None:
    bench = _load()
    boxes = torch.tensor([[100.0, 20.0, 150.5, 60.0], [100.0, 20.0, 128.0, 60.0]])
    crops = [torch.ones((40, 51), dtype=torch.bool), torch.ones((40, 28), dtype=torch.bool)]
    c = Candidates(Detections(boxes, torch.tensor([0.9, 0.8]), torch.tensor([2, 2])),
                   LocalMasks(crops, torch.tensor([[100, 20], [100, 20]]), (200, 200)),
                   torch.tensor([0, 1]), torch.tensor([False, True]),
                   [(0, 0, 200, 200), (0, 0, 128, 200)], None)
    # Scores as the predictor passes them on: float32 values as Python floats.
    whole_score, cut_score = (float(torch.tensor(v)) for v in (0.9, 0.8))
    results = [
        _pred((100, 20, 150, 60), whole_score) | {"bbox": [100.0, 20.0, 50.5, 40.0],
                                                   "category_id": 7},  # the whole one
        _pred((100, 20, 128, 60), cut_score) | {"category_id": 7},  # the cut one
        _pred((100, 20, 150, 60), cut_score) | {"bbox": [100.0, 20.0, 50.5, 40.0],
                                                 "category_id": 7},  # a union
        _pred((100, 20, 150, 60), whole_score) | {"bbox": [100.0, 20.0, 50.5, 40.0]},
    ]
    bench.mark_from_cut(results, c, {1: 1, 2: 7})
    assert [r["from_cut"] for r in results] == [False, True, True, True]


def test_each_mosaic_cell_is_an_image_and_a_prediction_belongs_to_its_centre_s_cell() -> None:
    bench = _load()
    # 540 px, a cell every 270 px: 2 x 2 cells, ids row by row.
    assert bench.cell_of([300, 10, 20, 20], 540, 270) == 2
    assert bench.cell_of([10, 280, 20, 20], 540, 270) == 3
    assert bench.cell_of([260, 260, 40, 40], 540, 270) == 4  # centre (280, 280)
    assert bench.cell_of([530, 530, 9, 9], 540, 270) == 4
    # Problems are counted per image: the same two predictions in another cell than the
    # object's are neither a duplicate nor a split.
    obj = {"id": 1, "image_id": 2, "category_id": 1, "segmentation": _rle(100, 20, 150, 60),
           "area": 2000.0, "bbox": [100, 20, 50, 40], "iscrowd": 0}
    truth = {"images": [{"id": i, "width": 200, "height": 200} for i in (1, 2)],
             "categories": [{"id": 1, "name": "a"}], "annotations": [obj]}
    preds = [_pred((100, 20, 150, 60)), {**_pred((100, 20, 128, 60), 0.8), "from_cut": True}]
    assert bench.scores(truth, preds)["duplicated_objects"] == 0
    for p in preds:
        p["image_id"] = 2
    got = bench.scores(truth, preds)
    assert (got["duplicated_objects"], got["split_objects"], got["objects"]) == (1, 1, 1)


def test_ap_counts_every_detection_of_an_image_not_the_first_hundred() -> None:
    bench = _load()
    squares = [(x, y, x + 10, y + 10) for y in range(0, 180, 15) for x in range(0, 180, 15)]
    objects = [{"id": k + 1, "image_id": 1, "category_id": 1, "segmentation": _rle(*b),
                "area": 100.0, "bbox": [b[0], b[1], 10, 10], "iscrowd": 0}
               for k, b in enumerate(squares)]
    truth = {"images": [{"id": 1, "width": 200, "height": 200}],
             "categories": [{"id": 1, "name": "a"}], "annotations": objects}
    assert len(objects) == 144
    got = bench.scores(truth, [_pred(b) for b in squares])
    assert got["mask_ap"] == 1.0 and got["box_ap"] == 1.0
