"""CocoDataset: decoding, label mapping, box handling, subfolder search and error messages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import v2

from maskrcnn.data.coco import CocoDataset, build_label_map
from maskrcnn.data.coco_schema import rle_string_counts
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.transforms import build_transforms

H, W = 12, 16


def _write_image(path: Path, height: int = H, width: int = W, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((height, width, 3), value, dtype=np.uint8)
    pixels[0, 0] = (10, 20, 30)
    Image.fromarray(pixels).save(path)


def _ann(ann_id: int, segmentation: Any, image_id: int = 1, category_id: int = 1,
         **extra: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, **extra}


def _write_coco(tmp_path: Path, annotations: list[dict[str, Any]],
                categories: list[dict[str, Any]] | None = None,
                images: list[dict[str, Any]] | None = None) -> Path:
    if images is None:
        images = [{"id": 1, "file_name": "a.png", "height": H, "width": W}]
        _write_image(tmp_path / "a.png")
    coco = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 1, "name": "thing"}]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def test_polygon_with_two_parts_decodes_to_their_union(tmp_path: Path) -> None:
    # Two rectangles as one instance: pixels x in [2, 6) x y in [2, 5), and x in [10, 12) x
    # y in [7, 9) (pycocotools' rasteriser covers [x0, x1) for an axis-aligned polygon).
    parts = [[2, 2, 6, 2, 6, 5, 2, 5], [10, 7, 12, 7, 12, 9, 10, 9]]
    ds = CocoDataset(_write_coco(tmp_path, [_ann(7, parts)]))
    image, target = ds[0]
    expected = np.zeros((H, W), dtype=np.uint8)
    expected[2:5, 2:6] = 1
    expected[7:9, 10:12] = 1
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, H, W) and image[:, 0, 0].tolist() == [10, 20, 30]
    assert isinstance(target["masks"], tv_tensors.Mask)
    assert target["masks"].dtype == torch.uint8
    np.testing.assert_array_equal(target["masks"][0].numpy(), expected)
    # No bbox in the annotation: the box is the mask's extent, xyxy.
    assert target["boxes"].tolist() == [[2.0, 2.0, 12.0, 9.0]]
    assert target["area"].tolist() == [12.0 + 4.0]
    assert target["image_id"] == 1


def test_uncompressed_rle_is_column_major(tmp_path: Path) -> None:
    # counts alternate background/foreground runs down the columns (Fortran order):
    # 3 zeros, then 4 ones = pixels (3, 0), (4, 0), (5, 0), (6, 0) of column 0.
    rle = {"size": [H, W], "counts": [3, 4, H * W - 7]}
    _, target = CocoDataset(_write_coco(tmp_path, [_ann(1, rle)]))[0]
    mask = target["masks"][0].numpy()
    assert mask.sum() == 4
    assert mask[3:7, 0].tolist() == [1, 1, 1, 1]


def test_compressed_rle_string_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    expected = (rng.random((H, W)) > 0.6).astype(np.uint8)
    encoded = mask_utils.encode(np.asfortranarray(expected))
    rle = {"size": [H, W], "counts": encoded["counts"].decode("ascii")}
    _, target = CocoDataset(_write_coco(tmp_path, [_ann(1, rle)]))[0]
    np.testing.assert_array_equal(target["masks"][0].numpy(), expected)
    assert target["area"].item() == float(expected.sum())


def test_bbox_xywh_becomes_xyxy_and_is_clipped(tmp_path: Path) -> None:
    square = [[1, 1, 3, 1, 3, 3, 1, 3]]
    anns = [
        _ann(1, square, bbox=[1.5, 2.0, 3.0, 4.0], area=99.0),
        _ann(2, square, bbox=[10.0, 8.0, 20.0, 20.0]),  # runs past the 16x12 image
        _ann(3, square, bbox=[20.0, 1.0, 5.0, 5.0]),  # wholly outside: dropped
    ]
    _, target = CocoDataset(_write_coco(tmp_path, anns))[0]
    assert target["boxes"].tolist() == [[1.5, 2.0, 4.5, 6.0], [10.0, 8.0, 16.0, 12.0]]
    assert target["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert tuple(target["boxes"].canvas_size) == (H, W)
    assert target["area"].tolist() == [99.0, 4.0]  # JSON area kept, else the mask's
    assert target["masks"].shape == (2, H, W)


def test_instance_with_empty_mask_is_dropped_with_or_without_transforms(tmp_path: Path) -> None:
    anns = [
        _ann(1, [[1, 1, 5, 1, 5, 5, 1, 5]], category_id=1),
        # Box inside the image, polygon wholly outside it: the mask has no pixel.
        _ann(2, [[30, 30, 40, 30, 40, 40]], bbox=[2, 2, 4, 4], category_id=2),
        # A sliver thinner than a pixel row rasterises to nothing either.
        _ann(3, [[2, 8, 12, 8.2, 2, 8.4]], bbox=[2, 8, 10, 0.4], category_id=2),
    ]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = _write_coco(tmp_path, anns, categories=cats)
    _, plain = CocoDataset(path)[0]
    _, flipped = CocoDataset(path, transforms=build_transforms([{"name": "hflip", "p": 1.0}],
                                                              train=True))[0]
    for target in (plain, flipped):
        assert target["labels"].tolist() == [1]
        assert target["masks"].shape == (1, H, W) and target["masks"].sum() == 16
        assert len(target["boxes"]) == len(target["area"]) == len(target["iscrowd"]) == 1


def test_windows_separators_in_file_name(tmp_path: Path) -> None:
    _write_image(tmp_path / "imgs" / "a.png", value=55)
    _write_image(tmp_path / "deep" / "b.png", value=66)
    images = [{"id": 1, "file_name": "imgs\\a.png", "height": H, "width": W},
              {"id": 2, "file_name": "moved\\b.png", "height": H, "width": W}]
    path = _write_coco(tmp_path, [], images=images)
    assert CocoDataset(path)[0][0][0, 5, 5].item() == 55
    # The basename search looks for 'b.png', not for the whole Windows path.
    assert CocoDataset(path, search_subfolders=True)[1][0][0, 5, 5].item() == 66


def test_crowd_regions_dropped_or_kept(tmp_path: Path) -> None:
    crowd_rle = {"size": [H, W], "counts": [0, 5, H * W - 5]}
    anns = [_ann(1, [[1, 1, 3, 1, 3, 3]]), _ann(2, crowd_rle, iscrowd=1)]
    path = _write_coco(tmp_path, anns)
    skipping = CocoDataset(path)
    _, target = skipping[0]
    assert target["iscrowd"].tolist() == [0]
    assert len(skipping.coco_json["annotations"]) == 2  # the evaluator still sees the crowd
    _, target = CocoDataset(path, skip_crowd=False)[0]
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["masks"][1].sum() == 5


def test_image_without_annotations_gives_empty_target(tmp_path: Path) -> None:
    _, target = CocoDataset(_write_coco(tmp_path, []))[0]
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["masks"].shape == (0, H, W) and target["masks"].dtype == torch.uint8
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64
    assert target["area"].shape == (0,) and target["iscrowd"].shape == (0,)


def test_non_contiguous_category_ids_map_to_sorted_labels(tmp_path: Path) -> None:
    cats = [{"id": 9, "name": "nine"}, {"id": 2, "name": "two"}, {"id": 5, "name": "five"}]
    anns = [_ann(1, [[1, 1, 3, 1, 3, 3]], category_id=9),
            _ann(2, [[5, 5, 8, 5, 8, 8]], category_id=2)]
    ds = CocoDataset(_write_coco(tmp_path, anns, categories=cats))
    assert ds.label_to_cat_id == {1: 2, 2: 5, 3: 9}
    assert ds.cat_id_to_label == {2: 1, 5: 2, 9: 3}
    assert ds.class_names == ["__background__", "two", "five", "nine"]
    assert ds[0][1]["labels"].tolist() == [3, 1]


def test_duplicate_category_names_get_their_id_appended() -> None:
    cats = [{"id": 3, "name": "facade"}, {"id": 0, "name": "facade"}, {"id": 1, "name": "car"}]
    label_to_cat_id, names = build_label_map(cats)
    assert label_to_cat_id == {1: 0, 2: 1, 3: 3}
    assert names == ["__background__", "facade#0", "car", "facade#3"]


def test_transforms_move_image_boxes_and_masks_together(tmp_path: Path) -> None:
    path = _write_coco(tmp_path, [_ann(1, [[2, 2, 6, 2, 6, 5, 2, 5]], bbox=[2, 2, 4, 3])])
    ds = CocoDataset(path, transforms=v2.RandomHorizontalFlip(p=1.0))
    image, target = ds[0]
    assert image[:, 0, W - 1].tolist() == [10, 20, 30]
    assert target["boxes"].tolist() == [[W - 6.0, 2.0, W - 2.0, 5.0]]
    assert target["masks"][0, 2:5, W - 6:W - 2].all() and target["masks"].sum() == 12


def test_metadata_needs_no_image_reads(tmp_path: Path) -> None:
    images = [{"id": 4, "file_name": "gone.png", "height": 10, "width": 30},
              {"id": 8, "file_name": "gone2.png", "height": 40, "width": 10}]
    ds = CocoDataset(_write_coco(tmp_path, [], images=images))
    assert len(ds) == 2 and ds.image_ids == [4, 8]
    assert ds.aspect_ratios() == [3.0, 0.25]
    assert ds.image_info(1) == {"id": 8, "file_name": "gone2.png", "height": 40, "width": 10}


def test_search_subfolders_finds_image_by_basename(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W}]
    _write_image(tmp_path / "deep" / "er" / "a.png", value=77)
    path = _write_coco(tmp_path, [], images=images)
    with pytest.raises(DatasetError, match=r"image id 1: .*a\.png.*search_subfolders"):
        CocoDataset(path)[0]
    image, _ = CocoDataset(path, search_subfolders=True)[0]
    assert image[0, 5, 5].item() == 77
    _write_image(tmp_path / "other" / "a.png")
    with pytest.raises(DatasetError, match="matches several files"):
        CocoDataset(path, search_subfolders=True)[0]


def _rle_string(height: int, width: int) -> str:
    ones = np.ones((height, width), dtype=np.uint8, order="F")
    return str(mask_utils.encode(ones)["counts"].decode("ascii"))


def test_rle_string_counts_match_the_runs_of_the_mask() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        height, width = rng.integers(1, 40, 2)
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        flat = mask.flatten(order="F")
        # Run lengths, starting with a (possibly empty) run of zeros.
        changes = np.flatnonzero(np.diff(flat)) + 1
        runs = np.diff(np.concatenate(([0], changes, [flat.size])))
        if flat[0] == 1:
            runs = np.concatenate(([0], runs))
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode("ascii")
        np.testing.assert_array_equal(rle_string_counts(counts), runs)
    assert rle_string_counts("") is None
    assert rle_string_counts("é") is None


@pytest.mark.parametrize(
    ("ann", "pattern"),
    [
        (_ann(5, [[1, 1, 4, 4]]), r"annotation id 5 .*polygon 0 has 2 points"),
        (_ann(5, [[1, 1, 4, 4, 5]]), r"annotation id 5 .*odd number"),
        (_ann(5, [[]]), r"annotation id 5 .*polygon 0 has 0 points"),
        (_ann(5, []), r"annotation id 5 .*empty segmentation"),
        (_ann(5, {"size": [H + 1, W], "counts": "abc"}), r"annotation id 5 .*RLE size"),
        (_ann(5, {"size": [H, W], "counts": [1, 2]}), r"annotation id 5 .*summing"),
        (_ann(5, {"size": [H, W], "counts": "abc"}), r"annotation id 5 .*compressed RLE"),
        (_ann(5, {"size": [H, W], "counts": _rle_string(H + 1, W)}), r"id 5 .*compressed RLE"),
        (_ann(5, [1, 1, 3, 1, 3, 3]), r"annotation id 5 .*not a flat list of numbers"),
        (_ann(5, [[1, 1, 3, 1, 3, 3]], category_id=42), r"annotation id 5 .*unknown category"),
        (_ann(5, [[1, 1, 3, 1, 3, 3]], image_id=42), r"annotation id 5 .*unknown image id 42"),
        (_ann(5, [[1, 1, 3, 1, 3, 3]], bbox=[1, 2]), r"annotation id 5 .*bbox"),
        ({"id": 5, "image_id": 1, "segmentation": []}, r"id 5.*\['category_id'\]"),
    ],
)
def test_structural_problems_raise_at_load(tmp_path: Path, ann: dict[str, Any],
                                           pattern: str) -> None:
    path = _write_coco(tmp_path, [ann])
    with pytest.raises(DatasetError, match=pattern) as info:
        CocoDataset(path)
    assert str(path) in str(info.value)


def test_duplicate_ids_raise(tmp_path: Path) -> None:
    square = [[1, 1, 3, 1, 3, 3]]
    with pytest.raises(DatasetError, match="annotation id 3 appears twice"):
        CocoDataset(_write_coco(tmp_path, [_ann(3, square), _ann(3, square)]))
    images = [{"id": 1, "file_name": "a.png", "height": H, "width": W}] * 2
    with pytest.raises(DatasetError, match="image id 1 appears twice"):
        CocoDataset(_write_coco(tmp_path, [], images=images))


def test_malformed_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"broken\.json: malformed JSON at line 1"):
        CocoDataset(path)
    path.write_text('{"images": []}')
    with pytest.raises(DatasetError, match="'categories' must be a list"):
        CocoDataset(path)
    with pytest.raises(DatasetError, match="not found"):
        CocoDataset(tmp_path / "absent.json")


def test_image_size_differing_from_json_raises_at_getitem(tmp_path: Path) -> None:
    images = [{"id": 6, "file_name": "a.png", "height": H, "width": W}]
    _write_image(tmp_path / "a.png", height=H + 2)
    ds = CocoDataset(_write_coco(tmp_path, [], images=images))
    with pytest.raises(DatasetError, match=rf"image id 6: .* is {H + 2}x{W} .* says {H}x{W}"):
        ds[0]


_scalars = st.none() | st.booleans() | st.integers(-3, 30) | st.floats() | st.text(max_size=3)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=12,
)
_FIELDS = ["id", "image_id", "category_id", "segmentation", "bbox", "iscrowd", "area",
           "size", "counts"]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(_FIELDS), value=_json_values, where=st.sampled_from(["ann", "rle"]))
def test_garbage_fields_raise_only_dataset_error(tmp_path: Path, field: str, value: Any,
                                                 where: str) -> None:
    ann = _ann(1, {"size": [H, W], "counts": [0, 5, H * W - 5]}, bbox=[1, 1, 4, 4])
    (ann if where == "ann" else ann["segmentation"])[field] = value
    path = _write_coco(tmp_path, [ann])
    try:
        ds = CocoDataset(path)
    except DatasetError:
        return
    _, target = ds[0]
    assert target["masks"].shape[1:] == (H, W)


FACADES = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "facades-valid"


@pytest.mark.skipif(not FACADES.is_dir(), reason="facades-valid not present")
def test_facades_valid_image_in_subfolder_matches_pycocotools() -> None:
    from pycocotools.coco import COCO

    ann_file = FACADES / "_annotations.coco.json"
    ds = CocoDataset(ann_file, search_subfolders=True)
    assert len(ds) == 108 and ds.class_names[1] == "facade#0" and ds.class_names[4] == "facade#3"
    index = ds.image_ids.index(3)  # one of the 24 images stored under images/
    assert ds.image_path(index).parent.name == "images"
    image, target = ds[index]
    assert image.shape == (3, 1024, 1024)
    coco = COCO(str(ann_file))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[3]))
    assert target["masks"].shape[0] == len(anns)
    for k in (0, len(anns) - 1):
        np.testing.assert_array_equal(target["masks"][k].numpy(), coco.annToMask(anns[k]))
        assert target["labels"][k].item() == ds.cat_id_to_label[anns[k]["category_id"]]
