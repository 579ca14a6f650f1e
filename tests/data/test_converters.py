"""Converters from LabelMe, YOLO-seg and instance-mask PNGs to COCO JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.checks import check_dataset
from maskrcnn.data.coco import CocoDataset
from maskrcnn.data.converters import labelme_to_coco, mask_pngs_to_coco, yolo_seg_to_coco
from maskrcnn.data.errors import DatasetError


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (50, 60, 70)).save(path)


def _shape(label: str, points: list[list[float]], kind: str = "polygon",
           group_id: int | None = None) -> dict[str, Any]:
    return {"label": label, "points": points, "shape_type": kind, "group_id": group_id}


def _labelme(path: Path, image: str, shapes: list[dict[str, Any]]) -> None:
    record = {"imagePath": image, "imageHeight": 40, "imageWidth": 60, "shapes": shapes}
    path.write_text(json.dumps(record))


def _by_id(coco: dict[str, Any]) -> dict[int, dict[str, Any]]:
    return {a["id"]: a for a in coco["annotations"]}


def test_labelme_shapes_become_coco_polygons(tmp_path: Path) -> None:
    _image(tmp_path / "one.png", 60, 40)
    _image(tmp_path / "two.png", 60, 40)
    _labelme(tmp_path / "one.json", "one.png", [
        _shape("dog", [[10, 5], [2, 1]], "rectangle"),
        _shape("cat", [[30, 20], [30, 25]], "circle"),
        _shape("cat", [[0, 0], [5, 0], [5, 5]], group_id=1),
        _shape("cat", [[10, 10], [15, 10], [15, 15]], group_id=1),
    ])
    _labelme(tmp_path / "two.json", "two.png", [_shape("dog", [[1, 1], [4, 1], [4, 4]]),
                                                _shape("dog", [[0, 0], [9, 9]], "line")])
    with pytest.warns(UserWarning, match="skipped 1 line/point"):
        out = labelme_to_coco(tmp_path, tmp_path / "coco.json")
    coco = json.loads(out.read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "cat"), (2, "dog")]
    assert [(i["id"], i["file_name"]) for i in coco["images"]] == [(1, "one.png"), (2, "two.png")]
    anns = _by_id(coco)
    assert len(anns) == 4
    # Rectangle corners are reordered to (x0, y0) ... whatever order they were drawn in.
    assert anns[1]["segmentation"] == [[2, 1, 10, 1, 10, 5, 2, 5]]
    assert anns[1]["bbox"] == [2, 1, 8, 4] and anns[1]["category_id"] == 2
    circle = np.array(anns[2]["segmentation"][0]).reshape(-1, 2)
    assert circle.shape == (32, 2)
    np.testing.assert_allclose(np.hypot(circle[:, 0] - 30, circle[:, 1] - 20), 5.0)
    # An inscribed 32-gon has area 16 r^2 sin(pi/16) = 78.04 for r = 5; rasterising it to
    # pixels moves that by at most a few pixels.
    assert abs(anns[2]["area"] - 16 * 25 * math.sin(math.pi / 16)) < 6
    assert len(anns[3]["segmentation"]) == 2  # one instance, two parts (same group_id)
    assert anns[3]["bbox"] == [0, 0, 15, 15]
    assert anns[4]["image_id"] == 2
    ds = CocoDataset(out)
    assert ds[0][1]["labels"].tolist() == [2, 1, 1]
    assert check_dataset(out).ok


def test_labelme_rejects_unknown_shapes_and_foreign_json(tmp_path: Path) -> None:
    _labelme(tmp_path / "one.json", "one.png", [_shape("x", [[0, 0], [1, 1]])])
    with pytest.raises(DatasetError, match=r"one\.json: shape 0: cannot convert a 'polygon' "
                                           "shape with 2 points"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")
    (tmp_path / "one.json").write_text('{"info": {}}')
    with pytest.raises(DatasetError, match="not a LabelMe file"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")


def test_labelme_image_path_is_relative_to_its_json(tmp_path: Path) -> None:
    # LabelMe's usual layout: JSONs in one folder, images beside it, imagePath '../images/..'.
    _image(tmp_path / "images" / "x.png", 60, 40)
    _image(tmp_path / "images" / "more" / "y.png", 60, 40)
    (tmp_path / "ann").mkdir()
    _labelme(tmp_path / "ann" / "x.json", "../images/x.png", [_shape("cat", [[1, 1], [9, 1],
                                                                              [9, 9]])])
    _labelme(tmp_path / "ann" / "y.json", "..\\images\\more\\y.png", [])  # Windows-made
    out = labelme_to_coco(tmp_path / "ann", tmp_path / "ann" / "coco.json")
    coco = json.loads(out.read_text())
    root = tmp_path.resolve() / "images"
    assert coco["info"]["image_root"] == str(root)
    assert [i["file_name"] for i in coco["images"]] == ["x.png", "more/y.png"]
    assert CocoDataset(out, root)[1][0].shape == (3, 40, 60)
    assert check_dataset(out, root).ok


def test_labelme_missing_image_or_input(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere: LabelMe folder not found"):
        labelme_to_coco(tmp_path / "nowhere", tmp_path / "out.json")
    with pytest.raises(DatasetError, match=r"no LabelMe \*\.json files"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")
    _labelme(tmp_path / "one.json", "../pics/one.png", [])
    with pytest.raises(DatasetError, match=r"one\.json: imagePath '\.\./pics/one\.png' points "
                       r"to .*pics/one\.png, which is not a file"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")


def _yolo_root(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    _image(root / "images" / "a.png", 100, 50)
    _image(root / "images" / "sub" / "b.png", 100, 50)
    _image(root / "images" / "c.jpg", 20, 20)
    (root / "labels" / "sub").mkdir(parents=True)
    (root / "labels" / "a.txt").write_text("1 0.1 0.2 0.5 0.2 0.5 0.8\n\n0 0.5 0.5 0.2 0.4\n")
    (root / "labels" / "sub" / "b.txt").write_text("0 0 0 1 0 1 1 0 1\n")
    return root


def test_yolo_polygons_are_denormalised(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    (root / "data.yaml").write_text("names:\n  0: person\n  1: bike\n")
    coco = json.loads(yolo_seg_to_coco(root, tmp_path / "out.json").read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "person"), (2, "bike")]
    assert [i["file_name"] for i in coco["images"]] == ["a.png", "c.jpg", "sub/b.png"]
    assert coco["images"][0]["width"] == 100 and coco["images"][0]["height"] == 50
    anns = _by_id(coco)
    assert anns[1]["category_id"] == 2
    assert anns[1]["segmentation"] == [[10.0, 10.0, 50.0, 10.0, 50.0, 40.0]]
    assert anns[1]["bbox"] == [10.0, 10.0, 40.0, 30.0]
    # A 4-number line is a box (cx, cy, w, h) = (50, 25, 20, 20) pixels.
    assert anns[2]["segmentation"] == [[40.0, 15.0, 60.0, 15.0, 60.0, 35.0, 40.0, 35.0]]
    assert anns[2]["area"] == 400.0
    assert anns[3]["image_id"] == 3 and anns[3]["area"] == 100 * 50
    assert not any(a["image_id"] == 2 for a in coco["annotations"])  # c.jpg: no label file
    assert check_dataset(tmp_path / "out.json", root / "images").ok


def test_yolo_names_from_argument_classes_txt_or_default(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    coco = json.loads(yolo_seg_to_coco(root, tmp_path / "o.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["class_0", "class_1"]
    (root / "classes.txt").write_text("walker\nrider\n")
    coco = json.loads(yolo_seg_to_coco(root, tmp_path / "o.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["walker", "rider"]
    coco = json.loads(yolo_seg_to_coco(root, tmp_path / "o.json", ["p", "q", "r"]).read_text())
    assert [c["name"] for c in coco["categories"]] == ["p", "q", "r"]
    with pytest.raises(DatasetError, match=r"a\.txt:1: class 1 but only 1 names"):
        yolo_seg_to_coco(root, tmp_path / "o.json", ["p"])


@pytest.mark.parametrize(("line", "pattern"), [
    ("0 0.1 0.1 0.2", r"a\.txt:1: a polygon needs an even number"),
    ("0 0.1 0.1 0.2 0.2 0.3", r"a\.txt:1: a polygon needs an even number"),
    ("x 0.1 0.1 0.2 0.2 0.3 0.3", r"a\.txt:1: not 'class x1 y1"),
    ("0 nan 0.1 0.5 0.1 0.5 0.5", r"a\.txt:1: coordinates must be finite"),
    ("0 0.1 inf 0.5 0.1 0.5 0.5", r"a\.txt:1: coordinates must be finite"),
    ("99999999999 0.1 0.1 0.5 0.1 0.5 0.5", r"a\.txt:1: class index 99999999999 is outside"),
    ("-1 0.1 0.1 0.5 0.1 0.5 0.5", r"a\.txt:1: class index -1 is outside"),
])
def test_yolo_bad_lines_name_file_and_line(tmp_path: Path, line: str, pattern: str) -> None:
    root = _yolo_root(tmp_path)
    (root / "labels" / "a.txt").write_text(line + "\n")
    with pytest.raises(DatasetError, match=pattern):
        yolo_seg_to_coco(root, tmp_path / "o.json")


def test_yolo_far_out_coordinates_are_clipped_and_bad_names_refused(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    (root / "labels" / "a.txt").write_text("0 -1e7 -1e7 1e7 -1e7 1e7 1e7 -1e7 1e7\n")
    coco = json.loads(yolo_seg_to_coco(root, tmp_path / "o.json").read_text())
    first = _by_id(coco)[1]  # the whole 100 x 50 image
    assert first["bbox"] == [0.0, 0.0, 100.0, 50.0] and first["area"] == 100 * 50
    (root / "data.yaml").write_text("names: 42\n")
    with pytest.raises(DatasetError, match=r"data\.yaml: 'names' must be a list or a mapping"):
        yolo_seg_to_coco(root, tmp_path / "o.json")


def test_labelme_non_finite_or_far_out_points(tmp_path: Path) -> None:
    _image(tmp_path / "one.png", 60, 40)
    _labelme(tmp_path / "one.json", "one.png",
             [_shape("x", [[math.nan, 1], [50, 5], [30, 40]])])
    with pytest.raises(DatasetError, match=r"one\.json: shape 0: coordinates must be finite"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")
    _labelme(tmp_path / "one.json", "one.png",
             [_shape("x", [[-1e9, -1e9], [1e9, -1e9], [1e9, 1e9], [-1e9, 1e9]])])
    coco = json.loads(labelme_to_coco(tmp_path, tmp_path / "out.json").read_text())
    (ann,) = coco["annotations"]
    assert ann["bbox"] == [0.0, 0.0, 60.0, 40.0] and ann["area"] == 60 * 40


def test_yolo_missing_folders_or_files(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    (root / "labels" / "a.txt").rename(root / "a.txt")
    (root / "labels" / "sub" / "b.txt").rename(root / "b.txt")
    with pytest.raises(DatasetError, match=r"labels: no \*\.txt label files"):
        yolo_seg_to_coco(root, tmp_path / "o.json")
    (root / "labels" / "sub").rmdir()
    (root / "labels").rmdir()
    with pytest.raises(DatasetError, match=r"labels: no labels folder"):
        yolo_seg_to_coco(root, tmp_path / "o.json")
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "labels").mkdir()
    with pytest.raises(DatasetError, match=r"empty/images: no image files"):
        yolo_seg_to_coco(empty, tmp_path / "o.json")


def test_yolo_labels_without_images_are_reported(tmp_path: Path) -> None:
    root = _yolo_root(tmp_path)
    (root / "labels" / "val").mkdir()
    (root / "labels" / "val" / "a.txt").write_text("0 0 0 1 0 1 1\n")
    with pytest.warns(UserWarning, match=r"1 label files pair with no image and are ignored: "
                      r"val/a\.txt"):
        coco = json.loads(yolo_seg_to_coco(root, tmp_path / "o.json").read_text())
    assert len(coco["annotations"]) == 3  # a.txt (2) and sub/b.txt (1); val/a.txt ignored
    # When nothing pairs (labels/val vs images/train, say), the layout is wrong: an error.
    for name in ("a.txt", "sub/b.txt"):
        (root / "labels" / name).unlink()
    with pytest.raises(DatasetError, match=r"none of the 1 label files pairs with an image"):
        yolo_seg_to_coco(root, tmp_path / "o.json")


def _penn_fudan(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    images, masks = tmp_path / "PNGImages", tmp_path / "PedMasks"
    _image(images / "Fudan1.png", 8, 6)
    _image(images / "Fudan2.png", 8, 6)
    ids = np.zeros((6, 8), dtype=np.uint8)
    ids[1:3, 1:4] = 1
    ids[3:6, 5:8] = 2
    masks.mkdir()
    # Penn-Fudan masks are palette PNGs: the stored values are instance ids, not colours.
    palette_image = Image.frombytes("P", (8, 6), ids.tobytes())
    palette_image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette_image.save(masks / "Fudan1_mask.png")
    Image.fromarray(np.zeros((6, 8), dtype=np.uint8)).save(masks / "Fudan2.png")
    return images, masks, ids


def test_instance_mask_pngs_become_rle_instances(tmp_path: Path) -> None:
    images, masks, ids = _penn_fudan(tmp_path)
    out = mask_pngs_to_coco(images, masks, tmp_path / "out.json", category_name="person")
    coco = json.loads(out.read_text())
    assert coco["categories"] == [{"id": 1, "name": "person", "supercategory": ""}]
    assert [i["file_name"] for i in coco["images"]] == ["Fudan1.png", "Fudan2.png"]
    anns = _by_id(coco)
    assert len(anns) == 2 and {a["image_id"] for a in anns.values()} == {1}
    for value, ann in ((1, anns[1]), (2, anns[2])):
        np.testing.assert_array_equal(mask_utils.decode(ann["segmentation"]), ids == value)
    assert anns[1]["bbox"] == [1.0, 1.0, 3.0, 2.0] and anns[1]["area"] == 6.0
    assert anns[2]["bbox"] == [5.0, 3.0, 3.0, 3.0] and anns[2]["area"] == 9.0
    assert check_dataset(out, images).ok


def test_mask_pngs_missing_or_mis_sized(tmp_path: Path) -> None:
    images, masks, _ = _penn_fudan(tmp_path)
    Image.fromarray(np.zeros((5, 8), dtype=np.uint8)).save(masks / "Fudan2.png")
    with pytest.raises(DatasetError, match=r"Fudan2\.png: mask is 5x8 \(HxW\) but the image "):
        mask_pngs_to_coco(images, masks, tmp_path / "out.json")
    (masks / "Fudan2.png").unlink()
    with pytest.raises(DatasetError, match=r"Fudan2\.png: no mask Fudan2\.png or Fudan2_mask"):
        mask_pngs_to_coco(images, masks, tmp_path / "out.json")


def test_mask_pngs_missing_folders(tmp_path: Path) -> None:
    images, masks, _ = _penn_fudan(tmp_path)
    with pytest.raises(DatasetError, match=r"nowhere: image folder not found"):
        mask_pngs_to_coco(tmp_path / "nowhere", masks, tmp_path / "out.json")
    with pytest.raises(DatasetError, match=r"nowhere: mask folder not found"):
        mask_pngs_to_coco(images, tmp_path / "nowhere", tmp_path / "out.json")
    (tmp_path / "blank").mkdir()
    with pytest.raises(DatasetError, match=r"blank: no image files \(\.bmp, "):
        mask_pngs_to_coco(tmp_path / "blank", masks, tmp_path / "out.json")


def test_labelme_absolute_image_paths_are_refused_and_far_ones_announced(
    tmp_path: Path,
) -> None:
    dataset = tmp_path / "data"
    _image(tmp_path / "elsewhere" / "x.png", 60, 40)  # beside the dataset, not in it
    (dataset / "ann").mkdir(parents=True)
    _labelme(dataset / "ann" / "x.json", "/etc/passwd", [])
    with pytest.raises(DatasetError, match=r"x\.json: imagePath '/etc/passwd' is absolute"):
        labelme_to_coco(dataset / "ann", tmp_path / "out.json")
    # LabelMe itself writes such paths when its output folder is elsewhere: converted, said.
    _labelme(dataset / "ann" / "x.json", "../../elsewhere/x.png", [])
    with pytest.warns(UserWarning, match=r"the images lie outside .*data; file names are "
                      r"relative to .*elsewhere"):
        out = labelme_to_coco(dataset / "ann", tmp_path / "out.json")
    coco = json.loads(out.read_text())
    assert coco["info"]["image_root"] == str((tmp_path / "elsewhere").resolve())
    assert coco["images"][0]["file_name"] == "x.png"


def test_labelme_sizes_must_match_the_image(tmp_path: Path) -> None:
    _image(tmp_path / "x.png", 60, 50)  # the LabelMe file says 40 x 60 (HxW)
    _labelme(tmp_path / "x.json", "x.png", [_shape("cat", [[1, 1], [9, 1], [9, 9]])])
    with pytest.raises(DatasetError, match=r"x\.json: imageHeight x imageWidth 40x60 differ "
                       r"from the image x\.png, 50x60 \(HxW\); fix"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")
    _image(tmp_path / "x.png", 40, 60)  # turned: height and width swapped
    with pytest.raises(DatasetError, match="height and width are swapped"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(DatasetError, match=r"x\.png"):
        labelme_to_coco(tmp_path, tmp_path / "out.json")


def test_mask_pngs_refuse_noise_and_the_images_folder_as_masks(tmp_path: Path) -> None:
    images, masks, _ = _penn_fudan(tmp_path)
    with pytest.raises(DatasetError, match="the masks folder is the images folder"):
        mask_pngs_to_coco(images, images, tmp_path / "out.json")
    photo = np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    _image(images / "Fudan1.png", 80, 60)
    Image.fromarray(photo).save(masks / "Fudan1_mask.png")
    with pytest.raises(DatasetError, match=r"Fudan1_mask\.png: \d+ distinct non-zero values.*"
                       r"this looks like a photo or noise"):
        mask_pngs_to_coco(images, masks, tmp_path / "out.json")
