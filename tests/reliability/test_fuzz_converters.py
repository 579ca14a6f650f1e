"""Fuzzing the converters as the COCO reader is fuzzed: a mangled LabelMe file or YOLO label
line either converts or is refused with a ``DatasetError`` naming the file; never another
exception, never a crash or a runaway allocation (NaN, infinities, huge numbers, wrong
types, huge class indices)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from maskrcnn.data.converters import labelme_to_coco, yolo_seg_to_coco
from maskrcnn.data.errors import DatasetError

H, W = 12, 16
SETTINGS = settings(max_examples=150, deadline=10_000, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
WILD_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([1e9, -1e9, 2**63, 1e308, 0.5, 3, 15.9]),
)
WILD = st.one_of(WILD_NUMBERS, st.text(max_size=4), st.none(), st.booleans(),
                 st.lists(WILD_NUMBERS, max_size=3))


def _converts_or_refuses(convert: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = convert()
        except DatasetError as err:
            assert str(err)  # says why
            return
    coco = json.loads(Path(out).read_text())
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert all(math.isfinite(v) for v in (x, y, w, h))
        assert -1 <= x <= W + 1 and -1 <= y <= H + 1 and w <= W + 1 and h <= H + 1


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz_converters")
    (root / "images").mkdir()
    Image.new("RGB", (W, H), (20, 30, 40)).save(root / "images" / "a.png")
    return root


@SETTINGS
@given(points=st.lists(st.lists(WILD, min_size=0, max_size=3), min_size=0, max_size=6),
       kind=st.sampled_from(["polygon", "rectangle", "circle", "line", "point", "bogus", None]),
       label=WILD, group=WILD, size=st.tuples(WILD, WILD))
def test_labelme_files(image_dir: Path, points: list[Any], kind: Any, label: Any, group: Any,
                       size: tuple[Any, Any]) -> None:
    folder = image_dir / "labelme"
    folder.mkdir(exist_ok=True)
    record = {"imagePath": "../images/a.png", "imageHeight": size[0], "imageWidth": size[1],
              "shapes": [{"label": label, "points": points, "shape_type": kind,
                          "group_id": group}]}
    (folder / "a.json").write_text(json.dumps(record, allow_nan=True))
    _converts_or_refuses(lambda: labelme_to_coco(folder, image_dir / "labelme.json"))


@SETTINGS
@given(tokens=st.lists(st.one_of(WILD_NUMBERS.map(str), st.text(max_size=5)), max_size=12),
       names=st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=3)))
def test_yolo_label_lines(image_dir: Path, tokens: list[str], names: list[str] | None) -> None:
    root = image_dir / "yolo"
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    Image.new("RGB", (W, H), (20, 30, 40)).save(root / "images" / "a.png")
    (root / "labels" / "a.txt").write_text(" ".join(tokens).replace("\n", " ") + "\n")
    _converts_or_refuses(lambda: yolo_seg_to_coco(root, image_dir / "yolo.json", names))
