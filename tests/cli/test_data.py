"""The ``data`` sub-commands, driven through a parser built with ``register``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.cli.main import main as _run


def test_synth_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["data", "synth", str(tmp_path), "--images", "5", "--size", "32", "--seed",
                 "4", "--split", "val", "--empty-fraction", "0.4"]) == 0
    coco = json.loads((tmp_path / "val.json").read_text())
    assert len(coco["images"]) == 5
    assert len({a["image_id"] for a in coco["annotations"]}) == 3  # 2 of 5 empty
    assert _run(["data", "check", str(tmp_path / "val.json")]) == 0
    out = capsys.readouterr().out
    assert "5 images (2 without annotations)" in out and "OK: 0 errors" in out


def test_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coco = {"images": [{"id": 1, "file_name": "lost.png", "height": 4, "width": 4}],
            "annotations": [], "categories": [{"id": 1, "name": "a"}]}
    (tmp_path / "d.json").write_text(json.dumps(coco))
    assert _run(["data", "check", str(tmp_path / "d.json"), "--images", str(tmp_path)]) == 1
    assert "missing_image" in capsys.readouterr().out
    Image.new("RGB", (4, 4)).save(tmp_path / "lost.png")
    assert _run(["data", "check", str(tmp_path / "d.json")]) == 0
    # Only warning left: the unused category; --strict turns it into a failure.
    assert _run(["data", "check", str(tmp_path / "d.json"), "--strict"]) == 1


def test_convert_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "msk").mkdir()
    Image.new("RGB", (6, 4)).save(tmp_path / "img" / "p.png")
    ids = np.zeros((4, 6), dtype=np.uint8)
    ids[0:2, 0:2] = 1
    ids[2:4, 3:6] = 2
    Image.fromarray(ids).save(tmp_path / "msk" / "p_mask.png")
    out = tmp_path / "coco.json"
    assert _run(["data", "convert", "masks", str(tmp_path / "img"), str(tmp_path / "msk"),
                 "--out", str(out), "--category", "ped"]) == 0
    assert "1 images, 2 annotations, 1 categories" in capsys.readouterr().out
    assert [a["area"] for a in json.loads(out.read_text())["annotations"]] == [4.0, 6.0]


def test_convert_reports_bad_input_on_stderr(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["data", "convert", "yolo", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 1
    assert "no images folder" in capsys.readouterr().err
    (tmp_path / "images").mkdir()
    assert _run(["data", "convert", "labelme", str(tmp_path / "images"),
                 "--out", str(tmp_path / "o.json")]) == 1
    assert "images: no LabelMe *.json files" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_convert_labelme_prints_the_image_root_to_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "ann").mkdir()
    Image.new("RGB", (6, 4)).save(tmp_path / "images" / "x.png")
    record = {"imagePath": "../images/x.png", "imageHeight": 4, "imageWidth": 6,
              "shapes": [{"label": "a", "points": [[0, 0], [3, 0], [3, 3]]}]}
    (tmp_path / "ann" / "x.json").write_text(json.dumps(record))
    out = tmp_path / "coco.json"
    assert _run(["data", "convert", "labelme", str(tmp_path / "ann"), "--out", str(out)]) == 0
    root = tmp_path.resolve() / "images"
    assert f"file names are relative to {root} (use it as --images" in capsys.readouterr().out
    assert _run(["data", "check", str(out), "--images", str(root)]) == 0


def test_check_allow_outside_root_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    (tmp_path / "sub").mkdir()
    coco = {"images": [{"id": 1, "file_name": "../x.png", "height": 4, "width": 4}],
            "annotations": [], "categories": []}
    (tmp_path / "sub" / "d.json").write_text(json.dumps(coco))
    assert _run(["data", "check", str(tmp_path / "sub" / "d.json")]) == 1
    assert "error     path_outside_root" in capsys.readouterr().out
    assert _run(["data", "check", str(tmp_path / "sub" / "d.json"), "--allow-outside-root"]) == 0
    assert "warning   path_outside_root" in capsys.readouterr().out


@pytest.mark.parametrize("split", ["../escape", "a/b", "a\\b", ".."])
def test_synth_refuses_a_split_that_is_a_path(
    tmp_path: Path, split: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert _run(["data", "synth", str(out), "--images", "1", "--split", split]) == 1
    assert f"error: split name {split!r} must be a plain name" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written, inside OUT or beside it


def test_synth_refuses_a_size_it_cannot_draw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["data", "synth", str(tmp_path / "out"), "--images", "1", "--size", "40000"]) == 1
    assert "error: size 40000 is more than 8192 pixels a side (an image of 40000 px takes 36 GiB" \
        in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["data"], ["data", "check"], ["data", "convert"], ["data", "convert", "labelme"],
    ["data", "convert", "yolo"], ["data", "convert", "masks"], ["data", "synth"],
])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _run([*argv, "--help"])
    assert info.value.code == 0
    assert f"usage: maskrcnn {' '.join(argv)}" in capsys.readouterr().out


@pytest.mark.parametrize(("fmt", "positionals", "layout"), [
    ("labelme", ["FOLDER"], "imagePath is\nresolved relative to that JSON file"),
    ("yolo", ["ROOT"], "ROOT/images/**/NAME.ext pairs with ROOT/labels/**/NAME.txt"),
    ("masks", ["IMAGES_DIR", "MASKS_DIR"], "pairs with MASKS_DIR/NAME.png or"),
])
def test_convert_help_explains_inputs_and_layout(
    fmt: str, positionals: list[str], layout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        _run(["data", "convert", fmt, "--help"])
    text = capsys.readouterr().out
    assert layout in text
    section = text.split("positional arguments:\n")[1].split("\n\n")[0].splitlines()
    # argparse lists a positional without help as its bare name.
    assert [line.split()[0] for line in section] == positionals
    assert all(len(line.split()) > 2 for line in section), section


def test_data_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["data"]) == 2
    assert "{check,convert,synth}" in capsys.readouterr().out
