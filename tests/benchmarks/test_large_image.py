"""The large-image benchmark's counts: objects found twice, pieces, and objects split at a
tile border, on hand-made predictions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from pycocotools import mask as mask_utils

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "large_image.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_large_image", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_large_image"] = module
    spec.loader.exec_module(module)
    return module


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


def test_a_piece_ending_on_a_tile_edge_across_the_object_is_a_split() -> None:
    bench = _load()
    obj = {"id": 1, "image_id": 1, "category_id": 1, "segmentation": _rle(100, 20, 150, 60),
           "area": 2000.0, "bbox": [100, 20, 50, 40], "iscrowd": 0}
    truth = {"images": [{"id": 1, "width": 200, "height": 200}],
             "categories": [{"id": 1, "name": "a"}], "annotations": [obj]}
    whole = _pred((100, 20, 150, 60))
    cut = _pred((100, 20, 128, 60), 0.8)  # the left part, ending on the edge x = 128
    inner = _pred((110, 30, 125, 50), 0.7)  # a piece ending nowhere near an edge
    got = bench.scores(truth, [whole, cut], edges=[64, 128])
    assert (got["duplicated_objects"], got["pieces"], got["split_objects"]) == (1, 0, 1)
    got = bench.scores(truth, [whole, inner], edges=[64, 128])
    assert (got["duplicated_objects"], got["pieces"], got["split_objects"]) == (0, 1, 0)
    # The same piece, but the edge x = 128 is not a tile edge: no split.
    assert bench.scores(truth, [whole, cut], edges=[64, 160])["split_objects"] == 0
    assert bench.scores(truth, [whole], edges=[128])["split_objects"] == 0
