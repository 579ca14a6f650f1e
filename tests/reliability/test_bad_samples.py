"""A corrupt image in the middle of a training set: by default a clear error naming the file
and the image id; with ``data.on_bad_sample=skip`` the run logs it, skips it, counts it and
prints the count in its summary."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from maskrcnn.cli.main import main
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.synthetic import make_synthetic_coco
from maskrcnn.engine.trainer import Trainer
from tiny_run import TINY, tiny_config

BAD_ID = 4  # image ids run from 1 to 6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corrupt_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """6 synthetic images; image id 4 truncated to half its bytes."""
    root = tmp_path_factory.mktemp("bad_samples")
    ann = make_synthetic_coco(root, 6, size=64, seed=3)
    image = next(i for i in json.loads(ann.read_text())["images"] if i["id"] == BAD_ID)
    path = root / image["file_name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return ann, path


def _data(ann: Path) -> list[str]:
    return [f"data.train_json={ann}", f"data.train_images={ann.parent}", "solver.max_iter=3"]


@pytest.mark.parametrize("workers", [0, 1])
def test_by_default_a_corrupt_image_stops_training_naming_it(
    tmp_path: Path, corrupt_set: tuple[Path, Path], workers: int
) -> None:
    ann, bad = corrupt_set
    cfg = tiny_config(tmp_path, *_data(ann), f"data.num_workers={workers}")
    with pytest.raises(DatasetError) as info:
        Trainer(cfg, show_progress=False).train()
    message = str(info.value)
    assert f"image id {BAD_ID}:" in message and str(bad) in message
    assert "cannot decode" in message


def test_skip_logs_skips_and_counts_the_corrupt_image(
    tmp_path: Path, corrupt_set: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ann, bad = corrupt_set
    # 6 images, batch 2, 3 iterations: one epoch, every image once.
    argv = ["train", *TINY, f"run.output_dir={tmp_path}", *_data(ann), "data.on_bad_sample=skip"]
    with caplog.at_level(logging.WARNING, logger="maskrcnn"):
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 3 iterations" in out
    assert "skipped samples: 1" in out
    skipped = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert len(skipped) == 1
    assert f"image id {BAD_ID}:" in skipped[0] and str(bad) in skipped[0]


def test_skip_stops_when_every_image_is_bad(tmp_path: Path) -> None:
    root = tmp_path / "all_bad"
    ann = make_synthetic_coco(root, 4, size=64, seed=3)
    for image in json.loads(ann.read_text())["images"]:
        (root / image["file_name"]).write_bytes(b"not an image")
    cfg = tiny_config(tmp_path, *_data(ann), "data.on_bad_sample=skip", "data.num_workers=0")
    with pytest.raises(DatasetError, match=r"every training image of epoch 0 was skipped"):
        Trainer(cfg, show_progress=False).train()
