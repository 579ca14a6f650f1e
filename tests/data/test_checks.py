"""check_dataset: each finding on a small broken dataset, and the real facades-valid quirks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maskrcnn.data.checks import CheckReport, ClassCount, check_dataset

FACADES = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "facades-valid"
SQUARE = [[2, 2, 6, 2, 6, 6, 2, 6]]


def _img(image_id: int, file_name: str, height: int = 20, width: int = 30) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def _ann(ann_id: int, image_id: int = 1, category_id: int = 1, segmentation: Any = SQUARE,
         **extra: Any) -> dict[str, Any]:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id,
            "segmentation": segmentation, **extra}


def _write(root: Path, images: list[dict[str, Any]], annotations: list[dict[str, Any]],
           categories: list[dict[str, Any]] | None = None) -> Path:
    cats = categories or [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": cats}))
    return path


def _png(path: Path, width: int = 30, height: int = 20) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height)).save(path)


def _codes(report: CheckReport) -> dict[str, list[tuple[int | None, int | None]]]:
    found: dict[str, list[tuple[int | None, int | None]]] = {}
    for f in report.findings:
        found.setdefault(f.code, []).append((f.image_id, f.ann_id))
    return found


def test_clean_dataset_passes_with_counts(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    _png(tmp_path / "y.png")
    _png(tmp_path / "z.png")
    anns = [_ann(1), _ann(2, category_id=2), _ann(3, image_id=2, category_id=2)]
    report = check_dataset(_write(tmp_path, [_img(1, "x.png"), _img(2, "y.png"),
                                             _img(3, "z.png")], anns))
    assert report.ok and report.findings == []
    assert (report.num_images, report.num_annotations, report.num_empty_images) == (3, 3, 1)
    assert report.class_counts == [ClassCount(1, 1, "a", 1, 1), ClassCount(2, 2, "b", 2, 2)]
    assert report.summary_table().endswith("OK: 0 errors, 0 warnings")


def test_image_problems(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png")
    _png(tmp_path / "sub" / "moved.png")
    _png(tmp_path / "small.png", width=10)
    (tmp_path / "empty.png").write_bytes(b"")
    _png(tmp_path.parent / "outside.png")
    images = [_img(1, "ok.png"), _img(2, "moved.png"), _img(3, "small.png"),
              _img(4, "empty.png"), _img(5, "nowhere.png"), _img(6, "../outside.png")]
    report = check_dataset(_write(tmp_path, images, [_ann(1)]))
    codes = _codes(report)
    assert codes["missing_image"] == [(2, None), (5, None)]
    assert codes["size_mismatch"] == [(3, None)]
    assert codes["unreadable_image"] == [(4, None)]
    assert codes["path_outside_root"] == [(6, None)]
    moved = next(f for f in report.findings if f.image_id == 2)
    assert "found at sub/moved.png; use search_subfolders" in moved.message
    assert "20x10 (HxW" in next(f for f in report.findings if f.image_id == 3).message
    assert not report.ok and len(report.errors) == 5  # '../outside.png' counts: see below
    again = check_dataset(tmp_path / "ann.json", search_subfolders=True)
    assert _codes(again)["missing_image"] == [(5, None)]


def test_one_file_under_two_image_ids_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    _png(tmp_path / "y.png")
    images = [_img(1, "x.png"), _img(2, "y.png"), _img(3, "x.png"), _img(4, "./y.png")]
    report = check_dataset(_write(tmp_path, images, [_ann(1), _ann(2, image_id=3)]))
    assert _codes(report)["duplicate_file"] == [(3, None), (4, None)]
    assert "image id 3: 'x.png' is also image id 1" in report.errors[0].message


def test_images_over_the_loader_pixel_limit_are_errors(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")  # 30 x 20 = 600 pixels
    path = _write(tmp_path, [_img(1, "x.png")], [_ann(1)])
    assert check_dataset(path).ok  # the loader's default limit: 89.5 megapixels
    report = check_dataset(path, max_image_pixels=599)
    assert _codes(report)["image_too_large"] == [(1, None)]
    assert [f.message for f in report.errors] == [
        "image id 1: image too large: 30x20 (WxH) is 0.0 megapixels, more than the loader's "
        "limit of 0.0; "
        "downscale the file or raise the limit (data.max_image_pixels)"
    ]


def test_path_outside_root_is_an_error_as_the_dataset_refuses_it(tmp_path: Path) -> None:
    _png(tmp_path / "outside.png")
    _png(tmp_path / "root" / "in.png")
    ann = _write(tmp_path / "root", [_img(1, "in.png"), _img(2, "../outside.png")], [_ann(1)],
                 [{"id": 1, "name": "a"}])
    (finding,) = check_dataset(ann).findings
    assert (finding.severity, finding.code, finding.image_id) == ("error", "path_outside_root", 2)
    assert "data.allow_outside_root=true" in finding.message
    allowed = check_dataset(ann, allow_outside_root=True)
    assert allowed.ok and [(f.severity, f.code) for f in allowed.findings] == [
        ("warning", "path_outside_root")]


def test_windows_separators_in_file_name_are_found(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "a.png")
    _png(tmp_path / "deep" / "b.png")
    ann = _write(tmp_path, [_img(1, "imgs\\a.png"), _img(2, "other\\b.png")],
                 [_ann(1), _ann(2, image_id=2)], [{"id": 1, "name": "a"}])
    assert _codes(check_dataset(ann))["missing_image"] == [(2, None)]
    # The basename search must see 'b.png', not the whole 'other\\b.png'.
    assert check_dataset(ann, search_subfolders=True).findings == []


def test_annotation_geometry_warnings(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    anns = [
        _ann(1, bbox=[2, 2, 0, 4]),  # no width
        _ann(2, segmentation=[[25, 2, 30, 2, 30, 6, 25, 6]], bbox=[25, 2, 10, 4]),  # to x=35
        _ann(3, segmentation=[[2, 2, 40, 2, 40, 6]]),  # polygon past the right edge
        _ann(4, segmentation=[[1, 1, 2, 2, 3, 3]]),  # collinear: zero area
        _ann(5, bbox=[20, 10, 4, 4]),  # nowhere near the square at (2, 2)-(6, 6)
        _ann(6, bbox=[2.5, 2, 4, 4]),  # off by half a pixel: fine
        _ann(7, bbox=[30, 2, 4, 4]),  # starts at the right edge: wholly outside
    ]
    report = check_dataset(_write(tmp_path, [_img(1, "x.png")], anns))
    codes = _codes(report)
    assert codes["degenerate_box"] == [(1, 1)]
    assert codes["box_outside_image"] == [(1, 2), (1, 7)]
    assert "lies outside" in next(f for f in report.findings if f.ann_id == 7).message
    assert codes["polygon_outside_image"] == [(1, 3)]
    assert codes["degenerate_polygon"] == [(1, 4)]
    assert codes["empty_mask"] == [(1, 4)]
    assert "the dataset drops this instance" in next(
        f for f in report.findings if f.code == "empty_mask").message
    assert codes["bbox_mask_mismatch"] == [(1, 5), (1, 7)]
    assert codes["unused_category"] == [(None, None)]
    assert report.ok  # warnings only: the dataset still loads and trains


def test_structural_errors_are_all_listed(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    anns = [_ann(1, segmentation=[[1, 1, 4, 4]]), _ann(2, category_id=9), _ann(3), _ann(3),
            _ann(4, segmentation={"size": [5, 5], "counts": "xyz"}), _ann(5, bbox=[30, 0, 5, 5]),
            {"id": 6, "category_id": 1, "segmentation": SQUARE}]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]
    report = check_dataset(_write(tmp_path, [_img(1, "x.png")], anns, cats))
    codes = _codes(report)
    assert codes["bad_segmentation"] == [(1, 1), (1, 4)]
    assert codes["bad_reference"] == [(1, 2)]
    assert codes["duplicate_annotation_id"] == [(1, 3)]
    assert codes["missing_key"] == [(None, 6)]
    assert codes["duplicate_category_name"] == [(None, None)]
    # Annotations with errors are left out of the geometry checks; the others still run.
    assert codes["box_outside_image"] == [(1, 5)]
    assert "polygon 0 has 2 points" in report.errors[0].message
    table = report.summary_table()
    assert "bad_segmentation" in table and "FAILED: 5 errors" in table


def test_unparsable_or_shapeless_json(tmp_path: Path) -> None:
    (tmp_path / "ann.json").write_text("{oops")
    report = check_dataset(tmp_path / "ann.json")
    assert [f.code for f in report.findings] == ["invalid_json"] and not report.ok
    (tmp_path / "ann.json").write_text('{"images": [{"id": 1}], "categories": []}')
    report = check_dataset(tmp_path / "ann.json")
    assert [f.code for f in report.findings] == ["missing_key"]
    (tmp_path / "ann.json").write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
    report = check_dataset(tmp_path / "ann.json")
    assert [f.message for f in report.findings] == [
        f"{tmp_path / 'ann.json'}: JSON nested too deeply to be a COCO file"
    ]
    (tmp_path / "ann.json").write_text('{"images": [{"id": ' + "9" * 5000 + "}]}")
    report = check_dataset(tmp_path / "ann.json")
    assert [f.code for f in report.findings] == ["invalid_json"]
    assert "unreadable JSON value" in report.findings[0].message


def test_invalid_image_is_reported_once_with_its_bad_value(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    _png(tmp_path / "y.png")
    images = [_img(1, "x.png"), {**_img(2, "y.png"), "height": 20.0}]
    anns = [_ann(1), _ann(2, image_id=2), _ann(3, image_id=2)]
    report = check_dataset(_write(tmp_path, images, anns, [{"id": 1, "name": "a"},
                                                           {"id": 2, "name": "b"}]))
    assert [(f.code, f.image_id) for f in report.errors] == [("bad_size", 2)]
    assert report.errors[0].message == ("image id 2: height and width must be positive ints, "
                                        "got height=20.0 (float), width=30; its 2 annotations "
                                        "not checked")
    # Counts come from the raw JSON although the check stopped after the structure.
    assert (report.num_images, report.num_annotations, report.num_empty_images) == (2, 3, 0)
    assert report.class_counts == [ClassCount(1, 1, "a", 3, 2), ClassCount(2, 2, "b", 0, 0)]
    assert _codes(report)["unused_category"] == [(None, None)]


def test_rejected_annotations_still_count_as_uses(tmp_path: Path) -> None:
    _png(tmp_path / "x.png")
    anns = [_ann(1, segmentation=[])]  # the only annotation of category 'a' is invalid
    report = check_dataset(_write(tmp_path, [_img(1, "x.png")], anns, [{"id": 1, "name": "a"}]))
    assert [f.code for f in report.findings] == ["bad_segmentation"]
    assert (report.num_annotations, report.num_empty_images) == (1, 0)
    assert report.class_counts == [ClassCount(1, 1, "a", 1, 1)]


def test_exif_rotated_image_compares_by_displayed_size(tmp_path: Path) -> None:
    img = Image.new("RGB", (30, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated: 30 high, 20 wide
    img.save(tmp_path / "r.png", exif=exif)
    report = check_dataset(_write(tmp_path, [_img(1, "r.png", height=30, width=20)], []))
    assert "size_mismatch" not in _codes(report)
    # Annotated on the stored (unrotated) pixels: flagged, with the likely cause.
    report = check_dataset(_write(tmp_path, [_img(1, "r.png", height=20, width=30)], []))
    (finding,) = [f for f in report.findings if f.code == "size_mismatch"]
    assert "file is 30x20" in finding.message and "EXIF orientation" in finding.message


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 40) | st.floats() | st.text(max_size=4),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=10,
)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from(["images", "annotations", "categories"]),
       key=st.sampled_from(["id", "file_name", "height", "width", "image_id", "category_id",
                            "segmentation", "bbox", "name", "iscrowd"]),
       value=_values)
def test_garbage_never_crashes_the_checker(tmp_path: Path, section: str, key: str,
                                           value: Any) -> None:
    _png(tmp_path / "x.png")
    coco = {"images": [_img(1, "x.png")], "annotations": [_ann(1, bbox=[2, 2, 4, 4])],
            "categories": [{"id": 1, "name": "a"}]}
    coco[section][0][key] = value
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    report = check_dataset(tmp_path / "ann.json")
    assert all(f.severity in ("error", "warning") for f in report.findings)
    report.summary_table()


needs_facades = pytest.mark.skipif(not FACADES.is_dir(), reason="facades-valid not present")


@needs_facades
def test_facades_valid_real_quirks_are_found_quickly() -> None:
    start = time.perf_counter()
    report = check_dataset(FACADES / "_annotations.coco.json")
    assert time.perf_counter() - start < 3.0
    missing = [f for f in report.findings if f.code == "missing_image"]
    assert len(missing) == 24
    assert all("; found at images/" in f.message for f in missing)
    names = [f for f in report.findings if f.code == "duplicate_category_name"]
    assert len(names) == 1 and "[0, 3] are all named 'facade'" in names[0].message
    assert report.num_images == 108 and report.num_annotations == 3849
    assert sum(c.instances for c in report.class_counts) == 3849
    assert [c.name for c in report.class_counts if c.cat_id in (0, 3)] == ["facade#0", "facade#3"]


@needs_facades
def test_facades_valid_passes_with_subfolder_search() -> None:
    report = check_dataset(FACADES / "_annotations.coco.json", search_subfolders=True)
    assert report.ok
    assert {f.code for f in report.findings} == {"duplicate_category_name", "unused_category"}


def test_a_pipe_or_folder_in_place_of_an_image_is_named_as_such(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    path = _write(tmp_path, [_img(1, "pipe.png"), _img(2, "folder.png")], [_ann(1), _ann(2, 2)])
    report = check_dataset(path)
    assert _codes(report)["not_a_file"] == [(1, None), (2, None)]
    assert "missing_image" not in _codes(report)
    assert "'pipe.png' is not a regular file" in report.errors[0].message


def test_pixels_that_do_not_decode_are_found_unless_headers_only(tmp_path: Path) -> None:
    """A JPEG cut to a third of its bytes: its header reads, its pixels do not."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "x.jpg")
    data = (tmp_path / "x.jpg").read_bytes()
    (tmp_path / "x.jpg").write_bytes(data[: len(data) // 3])
    path = _write(tmp_path, [_img(1, "x.jpg", 120, 160)], [_ann(1)])
    report = check_dataset(path)
    assert _codes(report)["corrupt_image"] == [(1, None)]
    assert "image id 1:" in report.errors[0].message and "x.jpg" in report.errors[0].message
    assert check_dataset(path, decode=False).ok


def test_decoding_notes_animated_cmyk_and_16_bit_files(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (30, 20), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    Image.new("CMYK", (30, 20), (0, 50, 100, 0)).save(tmp_path / "c.jpg")
    Image.fromarray(np.full((20, 30), 40000, dtype=np.uint16)).save(tmp_path / "g.png")
    images = [_img(1, "a.gif"), _img(2, "c.jpg"), _img(3, "g.png")]
    report = check_dataset(_write(tmp_path, images, [_ann(1), _ann(2, 2), _ann(3, 3)]))
    assert report.ok and _codes(report)["image_mode"] == [(1, None), (2, None), (3, None)]
    notes = " | ".join(f.message for f in report.warnings if f.code == "image_mode")
    assert "animated (2 frames)" in notes and "CMYK" in notes and "top 8 bits" in notes
