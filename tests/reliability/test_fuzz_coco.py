"""Fuzzing the COCO reader: a mangled annotation file either loads (and its samples read) or
is refused with a ``DatasetError`` that says why; never a bare ``KeyError``/``TypeError``/
``OverflowError`` from deep inside, never a hang.

Each example starts from a valid file (polygon, compressed and uncompressed RLE, bbox, area,
crowd) and applies one to four random edits: delete a key or list item, replace a value with
something wild (NaN, infinities, huge ints, unicode, wrong types, RLE dicts with bad counts,
paths leaving the image root), or append an entry. ``check_dataset`` gets the same file.
"""

from __future__ import annotations

import copy
import faulthandler
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from maskrcnn.data.checks import check_dataset
from maskrcnn.data.coco import CocoDataset, segmentation_to_rle
from maskrcnn.data.errors import DatasetError

H, W = 12, 16
MAX_EXAMPLES = 2000
# A true hang (a C loop in the rasteriser) would never reach Hypothesis' deadline check, so a
# watchdog kills the test process, printing where it was stuck, if one file takes this long
# (they take milliseconds).
WATCHDOG_S = 60
# A file takes milliseconds; the far-away polygon took 34 s before it was clipped. Generous,
# so that two shared, busy cores do not make it flaky.
DEADLINE_MS = 10_000
FUZZED: list[int] = []
OUTCOMES: Counter[str] = Counter()

_RLE = {"size": [H, W], "counts": [3, 4, H * W - 7]}


def _compressed_counts() -> str:
    mask = np.zeros((H, W), dtype=np.uint8, order="F")
    mask[3:9, 4:10] = 1
    return str(mask_utils.encode(mask)["counts"].decode("ascii"))


COMPRESSED = _compressed_counts()


def _valid_coco(compressed: str) -> dict[str, Any]:
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": H, "width": W},
            {"id": 2, "file_name": "sub/b.png", "height": H, "width": W},
        ],
        "categories": [{"id": 1, "name": "thing"}, {"id": 7, "name": "ding"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 12.0,
             "bbox": [2, 2, 4, 3], "segmentation": [[2, 2, 6, 2, 6, 5, 2, 5]]},
            {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 1,
             "segmentation": copy.deepcopy(_RLE)},
            {"id": 3, "image_id": 2, "category_id": 7,
             "segmentation": {"size": [H, W], "counts": compressed}},
        ],
    }


_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**32, 2**63, 10**100, 10**400, H, W, H * W, 1e8, -1e9,
                     1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-100, max_value=100),
)
_names = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", "../a.png", "/etc/passwd", "C:\\a.png", "a\x00.png", "名前.png",
                     "x" * 300, "d/" * 100 + "a.png", "sub/../a.png", "sub/b.png", "a.png",
                     "\ud800.png"]),
)
_scalars = st.one_of(_numbers, _names, st.none(), st.booleans())
_rle = st.fixed_dictionaries({
    "size": st.one_of(st.just([H, W]), st.lists(st.integers(-3, 2**33), max_size=3)),
    "counts": st.one_of(
        st.text(alphabet=st.characters(min_codepoint=40, max_codepoint=120), max_size=12),
        st.lists(st.integers(-5, 2**40), max_size=6),
        st.just([H * W]),
        _scalars,
    ),
})
_polygon = st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-(2**70), 2**70),
                              st.floats(-50, 50)), min_size=0, max_size=14)
_wild: st.SearchStrategy[Any] = st.recursive(
    st.one_of(_scalars, _rle, _polygon, st.lists(_polygon, max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key/index path into ``node``, containers included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for k, value in enumerate(node):
            yield (*prefix, k)
            yield from _paths(value, (*prefix, k))


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        root = root[key]
    return root


def _fresh(value: Any) -> Any:
    # st.just() hands out the same list every time: edit a copy, never the strategy's value.
    return copy.deepcopy(value)


@st.composite
def mangled_coco(draw: st.DrawFn, compressed: str) -> dict[str, Any]:
    data = _valid_coco(compressed)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["delete", "replace", "number", "number", "name",
                                       "append"]))
        paths = list(_paths(data))
        if action in ("number", "name"):  # keep the structure, bend a value: many such load
            kinds = (int, float) if action == "number" else (str,)
            paths = [p for p in paths if type(_parent(data, p)[p[-1]]) in kinds]
        if not paths:
            continue
        path = draw(st.sampled_from(paths))
        parent = _parent(data, path)
        if action == "delete":
            del parent[path[-1]]
        elif action in ("replace", "number", "name"):
            wild = {"replace": _wild, "number": _numbers, "name": _names}[action]
            parent[path[-1]] = _fresh(draw(wild))
        elif isinstance(parent[path[-1]], list):
            item = parent[path[-1]]
            item.append(_fresh(item[0] if item and draw(st.booleans()) else draw(_wild)))
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(max_size=6))] = _fresh(draw(_wild))
    return data


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    pixels = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "a.png")
    (root / "sub").mkdir()
    Image.fromarray(pixels).save(root / "sub" / "b.png")
    return root


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    yield
    if FUZZED:  # shown with -s; docs/reliability.md quotes it
        print(f"\nfuzzed {len(FUZZED)} COCO files: {dict(OUTCOMES)}")


@contextmanager
def watchdog() -> Iterator[None]:
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_the_unmangled_file_loads(image_root: Path) -> None:
    ann = image_root / "valid.json"
    ann.write_text(json.dumps(_valid_coco(COMPRESSED)))
    ds = CocoDataset(ann, image_root, skip_crowd=False)
    assert [len(ds[i][1]["labels"]) for i in range(len(ds))] == [2, 1]
    assert check_dataset(ann, image_root).ok


def _exercise(ann: Path, root: Path) -> str:
    """``loaded`` / ``refused`` / ``sample refused``; anything else propagates."""
    with watchdog():
        check_dataset(ann, root)  # returns a report, whatever the file holds
        try:
            ds = CocoDataset(ann, root, skip_crowd=False)
        except DatasetError as err:
            assert str(err).startswith(str(ann)), err
            return "refused"
        outcome = "loaded"
        for i in range(len(ds)):
            try:
                _, target = ds[i]
            except DatasetError as err:
                assert f"image id {ds.image_ids[i]}" in str(err), err
                outcome = "sample refused"
                continue
            n = len(target["labels"])
            assert target["boxes"].shape == (n, 4) and target["masks"].shape[0] == n
        return outcome


# derandomize and no example database: the same 2,000 files on every run and machine.
@settings(max_examples=MAX_EXAMPLES, deadline=DEADLINE_MS, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=mangled_coco(COMPRESSED))
def test_mangled_files_load_or_raise_dataset_error(image_root: Path,
                                                   data: dict[str, Any]) -> None:
    ann = image_root / "fuzz.json"
    ann.write_text(json.dumps(data))
    FUZZED.append(1)
    OUTCOMES[_exercise(ann, image_root)] += 1


def _edit(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = _valid_coco(COMPRESSED)
    _parent(data, path)[path[-1]] = value
    return data


def _huge_image() -> dict[str, Any]:
    # 70000 x 70000 is more pixels than pycocotools' uint32 run lengths can count.
    data = _valid_coco(COMPRESSED)
    data["images"][1].update(height=70_000, width=70_000)
    data["annotations"][2]["segmentation"] = {"size": [70_000, 70_000],
                                              "counts": [70_000 * 70_000]}
    return data

# Cases the fuzzer found or that it reaches too rarely, each with what happened before the fix.
NASTY = {
    # segfault in pycocotools (int overflow in its rasteriser), in check_dataset and dataset[i]
    "polygon point at 2**63": (_edit(("annotations", 0, "segmentation", 0, 2), 2**63),
                               "loaded"),
    # 34 s per polygon and 1 GB, in check_dataset and dataset[i]
    "polygon point at 1e8": (_edit(("annotations", 0, "segmentation", 0, 3), 1e8), "loaded"),
    # bare OverflowError in dataset[i] (numpy float32 of a huge int)
    "area 2**2000": (_edit(("annotations", 0, "area"), 2**2000), "refused"),
    # OverflowError from pycocotools in check_dataset
    "image of 70000x70000 with a whole-image RLE": (_huge_image(), "refused"),
    # OSError (file name too long) from dataset[i]
    "file_name component of 300 bytes": (_edit(("images", 0, "file_name"), "x" * 300),
                                         "refused"),
    "file_name with a NUL byte": (_edit(("images", 0, "file_name"), "a\x00.png"), "refused"),
    "file_name leaving the root": (_edit(("images", 0, "file_name"), "../fuzz/a.png"),
                                   "refused"),
    "file_name of a missing image": (_edit(("images", 0, "file_name"), "名前.png"),
                                     "sample refused"),
}


@pytest.mark.parametrize("name", list(NASTY))
def test_nasty_cases(image_root: Path, name: str) -> None:
    data, expected = NASTY[name]
    ann = image_root / "nasty.json"
    ann.write_text(json.dumps(data))
    assert _exercise(ann, image_root) == expected


def test_checker_survives_a_path_longer_than_the_os_allows(image_root: Path) -> None:
    ann = image_root / "long.json"
    ann.write_text(json.dumps(_edit(("images", 0, "file_name"), "d/" * 2100 + "a.png")))
    ds = CocoDataset(ann, image_root)
    with pytest.raises(DatasetError, match="cannot access the image file"):
        ds[0]
    report = check_dataset(ann, image_root)
    assert not report.ok  # reported as a missing file, not a crash


@pytest.mark.parametrize("coordinate", [1e8, 1e9, 2.0**70, -1e12])
def test_far_away_polygon_points_are_clipped_not_rasterised(coordinate: float) -> None:
    # pycocotools walks every pixel step of every edge: a point at 1e8 took 34 s, larger ones
    # overflow its int coordinates. Clipped to the image's neighbourhood, it takes no time and
    # the pixels inside the image are unchanged.
    polygon = [0.0, 0.0, coordinate, 0.0, 0.0, coordinate]
    clipped = mask_utils.decode(segmentation_to_rle([polygon], H, W))
    if coordinate > 0:
        assert clipped.all()  # the triangle covers the whole image
    else:
        assert not clipped.any()
