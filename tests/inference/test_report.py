"""The evaluation report: its numbers on a hand-made case, and the page in a real browser."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from maskrcnn.cli.main import main
from maskrcnn.engine.coco_metrics import CocoEvaluator
from maskrcnn.inference.report import build_report

H, W = 40, 60
CHROMIUM = Path("/usr/bin/chromium")


def _square(y: int, x: int, size: int = 10) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y : y + size, x : x + size] = 1
    return mask


def _ann(ann_id: int, image_id: int, cat: int, mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode("ascii")
    x, y, w, h = mask_utils.toBbox(rle).tolist()
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "segmentation": rle,
            "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0}


def _prediction(items: list[tuple[int, float, np.ndarray]]) -> dict[str, torch.Tensor]:
    masks = np.stack([m for _, _, m in items]).astype(np.float32)
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return {"boxes": torch.tensor(boxes, dtype=torch.float32),
            "labels": torch.tensor([c for c, _, _ in items]),
            "scores": torch.tensor([s for _, s, _ in items]),
            "masks": torch.from_numpy(masks)[:, None]}


def test_scores_confusion_and_worst_images_by_hand() -> None:
    """Image 1: A found (0.9); an A prediction (0.8) on the B object: a false A, a missed B,
    and in the confusion matrix a B taken for an A. Image 2: A missed; a B (0.3) on nothing,
    below the 0.5 operating threshold."""
    a1, b1, a2 = _square(2, 2), _square(20, 30), _square(5, 40)
    gt = {"images": [{"id": 1, "height": H, "width": W, "file_name": "1.png"},
                     {"id": 2, "height": H, "width": W, "file_name": "2.png"}],
          "categories": [{"id": 1, "name": "A"}, {"id": 2, "name": "B"}],
          "annotations": [_ann(1, 1, 1, a1), _ann(2, 1, 2, b1), _ann(3, 2, 1, a2)]}
    evaluator = CocoEvaluator(gt, label_to_cat_id={1: 1, 2: 2})
    evaluator.update([_prediction([(1, 0.9, a1), (1, 0.8, b1)]),
                      _prediction([(2, 0.3, _square(30, 2))])], [1, 2])
    report = build_report(evaluator, evaluator.compute(), thresh=0.5)
    a, b = report.classes
    assert (a.name, a.ground_truth, b.ground_truth) == ("A", 2, 1)
    assert a.at_thresh == pytest.approx((0.5, 0.5, 0.5))
    assert a.best_thresh == pytest.approx(0.9)
    assert a.best == pytest.approx((1.0, 0.5, 2 / 3))
    assert b.at_thresh == (0.0, 0.0, 0.0) and b.best == (0.0, 0.0, 0.0)
    # rows: A, B, background (ground truth); columns: A, B, background (prediction)
    assert report.confusion.tolist() == [[1, 0, 1], [1, 0, 0], [0, 0, 0]]
    assert [(image_id, errors) for image_id, errors, _ in report.worst] == [(1, 2), (2, 1)]
    assert report.worst[0][2] == {"A", "B"}


@pytest.fixture(scope="module")
def evaluated(trained_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval")
    data = trained_tiny / "data"
    argv = ["eval", str(trained_tiny / "last.pth"), "--data", str(data / "val.json"),
            "--images", str(data), "--out", str(out), "--report", "--report-images", "4"]
    assert main(argv) == 0
    return out


def test_eval_report_writes_a_self_contained_page_and_confusion_files(evaluated: Path) -> None:
    page = (evaluated / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # opens offline
    assert page.count("data:image/png;base64,") >= 4  # confusion, two PR curves, gallery
    rows = list(csv.reader((evaluated / "confusion.csv").open()))
    assert rows[0][1:] == ["circle", "rectangle", "triangle", "background"]
    assert (evaluated / "confusion.png").stat().st_size > 0


@pytest.mark.browser
def test_report_in_a_real_browser(evaluated: Path) -> None:
    if not CHROMIUM.is_file() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    metrics = json.loads((evaluated / "metrics.json").read_text())
    with sync_api.sync_playwright() as p:
        # Generous timeouts: on two busy cores starting a browser can take long.
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox"], timeout=180_000)
        page = browser.new_page()
        page.set_default_timeout(180_000)
        page.goto((evaluated / "report.html").resolve().as_uri())
        for iou_type in ("bbox", "segm"):
            for key in ("AP", "AP50"):
                shown = page.inner_text(f'td[data-key="{iou_type}/{key}"]')
                assert float(shown) == pytest.approx(metrics[iou_type][key], abs=5e-4)
        shown = page.inner_text('td[data-key="segm/circle"]')
        assert float(shown) == pytest.approx(metrics["segm"]["per_class"]["circle"], abs=5e-4)
        cards = page.locator("#gallery .card")
        total = cards.count()
        assert total > 0
        page.select_option("#class-filter", "triangle")
        visible = [c for c in cards.all() if c.is_visible()]
        expected = [c for c in cards.all()
                    if "triangle" in json.loads(c.get_attribute("data-classes") or "[]")]
        assert len(visible) == len(expected)
        rows = page.locator("#per-class tr[data-class]")
        assert [r.get_attribute("data-class") for r in rows.all() if r.is_visible()] == [
            "triangle"]
        page.select_option("#class-filter", "")
        assert sum(c.is_visible() for c in cards.all()) == total
        browser.close()
