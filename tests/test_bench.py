"""``maskrcnn bench`` end to end at a tiny size (the figures themselves are not tested)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from maskrcnn import MaskRCNN, ModelConfig
from maskrcnn.bench import build_models, compare, format_report, main, run
from maskrcnn.cli.main import main as cli_main
from maskrcnn.config import to_dict


def test_report_has_every_section_and_ratio(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = run(size=(64, 96), repeats=1, skip=("train", "memory", "onnx", "int8"),
                 resize=(64, 96), loading_images=2)
    times = report["inference_s_per_image"]
    assert set(times) == {"torchvision", "ours", "ours_exact", "ours_fast"}
    assert all(v > 0 for v in times.values())
    assert set(report["paste_100_masks_s"]) == {"torchvision", "ours"}
    assert set(report["loading_s_per_sample"]) == {"torchvision", "ours"}
    assert 0 <= report["fast_vs_exact"]["box_iou"] <= 1
    text = format_report(report)
    assert "ours_fast" in text and "x faster" in text and "random weights" in text


def test_json_output(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    assert main((64, 96), 1, None, ("inference", "train", "memory", "onnx", "loading"),
                str(out)) == 0
    data = json.loads(out.read_text())
    assert data["image_size"] == [64, 96] and data["weights"] == "random"


def test_compare_of_identical_outputs() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 30]])
    masks = torch.zeros(2, 1, 50, 50)
    masks[0, 0, :10, :10] = 1
    masks[1, 0, 20:30, 20:40] = 1
    det = {"boxes": boxes, "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.8]),
           "masks": masks}
    assert compare(det, det) == {"box_iou": 1.0, "mask_iou": 1.0, "score_diff": 0.0}
    swapped = {**det, "labels": torch.tensor([2, 1])}  # a box only matches its own label
    assert compare(det, swapped)["box_iou"] == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_without_a_gpu_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["bench", "--device", "cuda"]) == 2
    assert "PyTorch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--size", "64"], "'64' is not HxW"),
        (["--size", "0x0"], "both sides must be positive"),
        (["--repeats", "0"], "must be at least 1"),
        (["--skip", "train,trian"], "unknown section.s. trian"),
    ],
)
def test_bad_options_are_usage_errors(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_weights_keep_their_number_of_classes_and_bad_files_are_named(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(num_classes=11, min_size=64, max_size=96)
    path = tmp_path / "last.pth"
    torch.save({"model": MaskRCNN(cfg).state_dict(), "config": {"model": to_dict(cfg)}}, path)
    ours, theirs = build_models(str(path), resize=(64, 96))
    assert ours.cfg.num_classes == 11
    assert theirs.roi_heads.box_predictor.cls_score.out_features == 11
    with pytest.raises(ValueError, match=r"weights file not found: .*nope\.pth"):
        build_models(str(tmp_path / "nope.pth"))
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth is not a readable"):
        build_models(str(tmp_path / "text.pth"))
    small = ModelConfig(backbone="resnet18", num_classes=3)
    torch.save({"model": {}, "config": {"model": to_dict(small)}}, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="resnet18 model"):
        build_models(str(tmp_path / "r18.pth"))


def test_a_json_path_that_cannot_be_written_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["bench", "--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path}: not a file in an existing folder" in capsys.readouterr().err
