"""The finetune_small recipe on real photos keeps its accuracy: a regression of the recipe or
of a norm choice fails here. Trains on 84 images of facades-valid and scores the other 24
(slow: some 15 minutes on two CPU cores, 6 s an iteration; skipped when the dataset is not
there)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from maskrcnn.config import load_train_config, recipe_path
from maskrcnn.engine.trainer import Trainer

FACADES = Path(__file__).resolve().parents[2].parent / "shared" / "datasets" / "facades-valid"
ANNOTATIONS = FACADES / "_annotations.coco.json"
TRAIN_IMAGES = 84
ITERATIONS = 150
# Measured once on the project's 2-core AMD EPYC (bf16, 2026-12-06): mask AP 0.046, box AP
# 0.049 (dense facades, 12 classes, 150 iterations). The floors leave a third of that for the
# run-to-run spread, which is not measured yet; a broken norm or recipe lands near 0.
MIN_MASK_AP = 0.03
MIN_BOX_AP = 0.03

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ANNOTATIONS.is_file(), reason="facades-valid not present"),
]


def split(out: Path) -> tuple[Path, Path]:
    """facades-valid's first TRAIN_IMAGES images (by id) to train on, the rest to score."""
    coco = json.loads(ANNOTATIONS.read_text())
    ids = sorted(img["id"] for img in coco["images"])
    parts = {"train": set(ids[:TRAIN_IMAGES]), "val": set(ids[TRAIN_IMAGES:])}
    paths = []
    for name, keep in parts.items():
        part = {
            **coco,
            "images": [i for i in coco["images"] if i["id"] in keep],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in keep],
        }
        path = out / f"{name}.json"
        path.write_text(json.dumps(part))
        paths.append(path)
    return paths[0], paths[1]


def test_finetune_small_reaches_its_measured_accuracy(tmp_path: Path) -> None:
    train, val = split(tmp_path)
    cfg = load_train_config(
        recipe_path("finetune_small"),
        [
            f"data.train_json={train}",
            f"data.val_json={val}",
            f"data.train_images={FACADES}",
            f"data.val_images={FACADES}",
            "data.search_subfolders=true",
            f"solver.max_iter={ITERATIONS}",
            "run.eval_period=0",
            "run.checkpoint_period=100000",
            "run.num_overlays=0",
            f"run.output_dir={tmp_path / 'run'}",
        ],
    )
    metrics = Trainer(cfg, show_progress=False).train()
    print(f"facades finetune_small: box AP {metrics['bbox']['AP']:.3f}, "
          f"mask AP {metrics['segm']['AP']:.3f}")
    assert metrics["segm"]["AP"] >= MIN_MASK_AP
    assert metrics["bbox"]["AP"] >= MIN_BOX_AP
