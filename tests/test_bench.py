"""``maskrcnn bench`` end to end at a tiny size (the figures themselves are not tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from maskrcnn.bench import compare, format_report, main, run
from maskrcnn.cli import main as cli_main


def test_report_has_every_section_and_ratio(tmp_path: Path) -> None:
    torch.manual_seed(0)
    report = run(size=(64, 96), repeats=1, skip=("train", "memory", "onnx"), resize=(64, 96),
                 loading_images=2)
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
