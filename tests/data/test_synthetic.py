"""make_synthetic_coco: determinism, occlusion handling and agreement of pixels and masks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from maskrcnn.data import synthetic
from maskrcnn.data.coco import CocoDataset, segmentation_to_rle
from maskrcnn.data.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), 60, size=64, seed=3)


def test_same_seed_gives_identical_files_and_splits_differ(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / "a", 6, size=32, seed=1)
    b = make_synthetic_coco(tmp_path / "b", 6, size=32, seed=1)
    c = make_synthetic_coco(tmp_path / "c", 6, size=32, seed=2)
    val = make_synthetic_coco(tmp_path / "a", 6, size=32, seed=1, split_name="val")
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a/train/000004.png").read_bytes() == (
        tmp_path / "b/train/000004.png").read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert (tmp_path / "a/train/000004.png").read_bytes() != (
        tmp_path / "a/val/000004.png").read_bytes()
    assert val == tmp_path / "a" / "val.json"


def test_layout_categories_and_empty_images(shapes: Path) -> None:
    coco = json.loads(shapes.read_text())
    assert shapes.name == "train.json"
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [
        (1, "circle"), (2, "rectangle"), (3, "triangle")]
    assert all((shapes.parent / i["file_name"]).is_file() for i in coco["images"])
    assert all(i["file_name"].startswith("train/") for i in coco["images"])
    annotated = {a["image_id"] for a in coco["annotations"]}
    assert len(coco["images"]) - len(annotated) == round(0.1 * 60)
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]])
    assert per_image.max() <= 4
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])


def test_storage_polygons_for_whole_polygons_rle_otherwise(shapes: Path) -> None:
    coco = json.loads(shapes.read_text())
    kinds = {(a["category_id"], isinstance(a["segmentation"], list)) for a in coco["annotations"]}
    # Circles are never polygons; rectangles/triangles appear both whole and occluded.
    assert kinds == {(1, False), (2, True), (2, False), (3, True), (3, False)}


def test_masks_are_disjoint_and_match_fields(shapes: Path) -> None:
    ds = CocoDataset(shapes)
    coco = ds.coco_json
    for ann in coco["annotations"]:
        rle = segmentation_to_rle(ann["segmentation"], 64, 64)
        assert float(mask_utils.area(rle)) == ann["area"] >= 16
        assert [float(v) for v in mask_utils.toBbox(rle)] == ann["bbox"]
    for k in range(len(ds)):
        _, target = ds[k]
        assert int(target["masks"].sum(dim=0).max()) <= 1


def test_pixels_inside_a_mask_are_one_flat_colour(shapes: Path) -> None:
    # Each shape is painted in one colour plus N(0, 8) noise; a mask that did not match the
    # painted region would take in the striped background and have a far larger spread.
    ds = CocoDataset(shapes)
    spreads = []
    for k in range(len(ds)):
        image, target = ds[k]
        for mask in target["masks"].bool():
            spreads.append(image[:, mask].float().std(dim=1).max().item())
    assert len(spreads) > 50
    assert max(spreads) < 12.0


def _fixed_shapes(monkeypatch: pytest.MonkeyPatch, masks: list[np.ndarray]) -> None:
    queue = [synthetic._Shape(1, m, None, np.array([200.0, 0, 0])) for m in masks]
    monkeypatch.setattr(synthetic, "_random_shape", lambda rng, size: queue.pop(0))


def test_later_shapes_occlude_earlier_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    back = np.zeros((32, 32), dtype=bool)
    back[0:10, 0:10] = True
    front = np.zeros((32, 32), dtype=bool)
    front[5:15, 5:15] = True
    _fixed_shapes(monkeypatch, [back, front])
    _, anns = synthetic._render(np.random.default_rng(0), 32, 2)
    visible_back = mask_utils.decode(anns[0]["segmentation"]).astype(bool)
    np.testing.assert_array_equal(visible_back, back & ~front)
    assert anns[0]["area"] == 100 - 25 and anns[1]["area"] == 100


def test_nearly_hidden_shapes_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    back = np.zeros((32, 32), dtype=bool)
    back[0:10, 0:10] = True
    front = np.zeros((32, 32), dtype=bool)
    front[0:10, 1:12] = True  # leaves a 10-pixel column of the back square: 10% visible
    _fixed_shapes(monkeypatch, [back, front])
    _, anns = synthetic._render(np.random.default_rng(0), 32, 2)
    assert [a["area"] for a in anns] == [110]


def test_two_hundred_images_take_seconds(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_coco(tmp_path, 200, size=128)
    assert time.perf_counter() - start < 8.0


def test_bad_arguments_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_objects"):
        make_synthetic_coco(tmp_path, 3, max_objects=0)


@pytest.mark.parametrize("split", ["../escape", "a/b", "a\\b", "..", ""])
def test_split_name_must_stay_inside_out_dir(tmp_path: Path, split: str) -> None:
    with pytest.raises(ValueError, match="must be a plain name"):
        make_synthetic_coco(tmp_path / "out", 1, split_name=split)
    assert list(tmp_path.iterdir()) == []


def test_every_image_meant_to_hold_objects_holds_one_even_when_small(tmp_path: Path) -> None:
    """At 16 px a shape can rasterise below the minimum size; it is redrawn, not lost (71
    of these 300 images had no object before)."""
    ann = make_synthetic_coco(tmp_path, 300, size=16, seed=0, empty_fraction=0.0)
    data = json.loads(ann.read_text())
    assert {a["image_id"] for a in data["annotations"]} == {i["id"] for i in data["images"]}
