"""Per-class weights of the classification loss: the weighted mean, names to labels, the
trainer's use of them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from maskrcnn.config import ModelConfig
from maskrcnn.engine.build import class_loss_weights
from maskrcnn.engine.logging import read_metrics
from maskrcnn.engine.trainer import Trainer
from maskrcnn.model.losses import fastrcnn_loss
from tiny_run import tiny_config


def test_weighted_cross_entropy_is_the_weighted_mean_of_the_rois() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0], [1.0, 0.0, 3.0]])
    labels = torch.tensor([0, 1, 2, 2])
    weights = torch.tensor([0.5, 1.0, 3.0])
    box = torch.zeros(4, 12)
    targets = torch.zeros(4, 4)
    per_roi = [math.log(sum(math.exp(v) for v in row)) - row[lab]
               for row, lab in zip(logits.tolist(), labels.tolist(), strict=True)]
    w = [0.5, 1.0, 3.0, 3.0]
    expected = sum(a * b for a, b in zip(w, per_roi, strict=True)) / sum(w)
    loss, _ = fastrcnn_loss(logits, box, labels, targets, weights)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    plain, _ = fastrcnn_loss(logits, box, labels, targets)
    assert float(plain) == pytest.approx(sum(per_roi) / 4, rel=1e-6)


def test_names_become_one_weight_per_label() -> None:
    names = ["__background__", "window", "Shop", "car"]
    got = class_loss_weights({"shop": 3.0, "Background": 0.5}, names)
    assert got.tolist() == [0.5, 1.0, 3.0, 1.0]
    with pytest.raises(ValueError, match=r"'shops'.*window, Shop, car"):
        class_loss_weights({"shops": 2.0}, names)


@pytest.mark.parametrize("bad", [{"shop": 0}, {"shop": -1.0}, {"shop": float("nan")},
                                 {"shop": True}, {"shop": "3"}])
def test_config_refuses_weights_that_are_not_positive_numbers(bad: dict) -> None:
    with pytest.raises(ValueError, match="class_loss_weights"):
        ModelConfig(class_loss_weights=bad)


def test_trainer_weights_the_classifier_loss_only(tmp_path: Path) -> None:
    runs = {}
    for name, extra in (("plain", []), ("weighted", ["model.class_loss_weights={triangle: 4}"])):
        trainer = Trainer(tiny_config(tmp_path / name, "solver.max_iter=1", *extra),
                          show_progress=False)
        heads = trainer.net.roi_heads
        if name == "weighted":
            assert heads.class_weights.tolist() == [1.0, 1.0, 1.0, 4.0]
            assert "roi_heads.class_weights" not in trainer.net.state_dict()
        else:
            assert heads.class_weights is None
        trainer.train()
        runs[name] = next(r for r in read_metrics(tmp_path / name / "metrics.jsonl")
                          if r["kind"] == "train")
    # Same seed, same first batch: only the classifier's loss changes (at initialisation
    # every RoI's cross-entropy is near log(4), so the weighted mean moves by ~1e-3).
    for key in ("loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"):
        assert runs["weighted"][key] == pytest.approx(runs["plain"][key], abs=1e-6), key
    assert abs(runs["weighted"]["loss_classifier"] - runs["plain"]["loss_classifier"]) > 2e-4
