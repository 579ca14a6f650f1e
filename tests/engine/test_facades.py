"""Training on the real, messy facades-valid dataset (skipped when it is not there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from maskrcnn.data.errors import DatasetError
from maskrcnn.engine.trainer import Trainer
from tiny_run import tiny_config

FACADES = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "facades-valid"
ANNOTATIONS = FACADES / "_annotations.coco.json"

pytestmark = pytest.mark.skipif(not ANNOTATIONS.is_file(), reason="facades-valid not present")


def _config(out: Path, *extra: str) -> list[str]:
    return [
        f"data.train_json={ANNOTATIONS}",
        f"data.train_images={FACADES}",
        "model.min_size=192",
        "model.max_size=192",
        "solver.max_iter=3",
        *extra,
    ]


def test_misplaced_images_stop_training_with_the_checker_advice(tmp_path: Path) -> None:
    # 24 images sit in a subfolder the JSON does not name: the first one read is an error
    # that names the file and the image id.
    trainer = Trainer(
        tiny_config(tmp_path, *_config(tmp_path, "data.batch_size=24")), show_progress=False
    )
    with pytest.raises(DatasetError, match=r"image id \d+"):
        trainer.train()


def test_trains_with_search_subfolders(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, *_config(tmp_path, "data.search_subfolders=true"))
    trainer = Trainer(cfg, show_progress=False)
    # 10 categories, two of them named "facade": kept apart as facade#0 and facade#3
    assert trainer.cfg.model.num_classes == 12
    assert "facade#0" in trainer.train_set.class_names
    trainer.train()
    assert trainer.iteration == 3 and (tmp_path / "last.pth").is_file()
