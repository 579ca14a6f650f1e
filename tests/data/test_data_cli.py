"""The ``data`` sub-commands, driven through a parser built with ``register``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.data.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="maskrcnn")
    register(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


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
                 "--out", str(tmp_path / "o.json")]) == 0


@pytest.mark.parametrize("argv", [
    ["data"], ["data", "check"], ["data", "convert"], ["data", "convert", "labelme"],
    ["data", "convert", "yolo"], ["data", "convert", "masks"], ["data", "synth"],
])
def test_every_command_has_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _run([*argv, "--help"])
    assert info.value.code == 0
    assert f"usage: maskrcnn {' '.join(argv)}" in capsys.readouterr().out


def test_data_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["data"]) == 2
    assert "{check,convert,synth}" in capsys.readouterr().out
