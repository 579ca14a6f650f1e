"""The training loop: loss goes down, resume is exact, accumulation is a mean, bf16 runs."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from maskrcnn.engine.checkpoint import CheckpointError, load_checkpoint
from maskrcnn.engine.logging import read_metrics
from maskrcnn.engine.trainer import NonFiniteLossError, Trainer
from tiny_run import tiny_config


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_training_lowers_the_loss_and_writes_the_run_folder(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "solver.max_iter=30", "solver.base_lr=0.02", "run.eval_period=30")
    trainer = Trainer(cfg, show_progress=False)
    metrics = trainer.train()
    losses = _losses(tmp_path)
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert set(metrics) == {"bbox", "segm"} and 0.0 <= metrics["segm"]["AP"] <= 1.0
    for name in (
        "last.pth",
        "best.pth",
        "config.yaml",
        "metrics.json",
        "loss_curves.png",
        "ap_curve.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["segm"]["AP"] == metrics["segm"]["AP"]
    )
    assert list((tmp_path / "overlays").glob("*.png"))
    assert list((tmp_path / "tensorboard").iterdir())


@pytest.mark.parametrize("sampling", ["uniform", "repeat factors"])
def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path: Path, sampling: str) -> None:
    n = 4
    # 12 images, batch 2: an epoch is 6 batches, so the run crosses an epoch boundary.
    extra = ["data.repeat_factor_threshold=0.9"] if sampling == "repeat factors" else []
    straight = Trainer(
        tiny_config(tmp_path / "a", f"solver.max_iter={2 * n}", "solver.steps=[5]", *extra),
        show_progress=False,
    )
    straight.train()
    first = Trainer(
        tiny_config(
            tmp_path / "b", f"solver.max_iter={n}", "solver.steps=[5]", "run.checkpoint_period=2",
            *extra,
        ),
        show_progress=False,
    )
    first.train()
    resumed = Trainer(
        tiny_config(tmp_path / "b", f"solver.max_iter={2 * n}", "solver.steps=[5]", *extra),
        resume=True,
        show_progress=False,
    )
    assert resumed.iteration == n
    resumed.train()
    a = load_checkpoint(tmp_path / "a" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "last.pth")
    assert a["iteration"] == b["iteration"] == 2 * n
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=0, msg=key)
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 2 * n
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), abs=1e-6)


def test_accumulation_is_the_gradient_of_the_mean_loss(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(
            tmp_path,
            "solver.accumulation_steps=2",
            "solver.max_iter=3",
            "solver.grad_clip_norm=null",
        ),
        show_progress=False,
    )
    stream = trainer.batches()
    micro = [next(stream), next(stream)]
    reference = copy.deepcopy(trainer.model)
    torch.manual_seed(7)
    total = sum(sum(reference(images, targets).values()) for images, targets in micro)
    assert isinstance(total, torch.Tensor)
    (total / 2).backward()
    torch.manual_seed(7)
    trainer.step(iter(micro))
    for (name, p), q in zip(trainer.model.named_parameters(), reference.parameters(), strict=True):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # The schedule counts optimiser steps, not micro-batches.
    assert trainer.scheduler.last_epoch == 1
    trainer.step(trainer.batches())
    assert trainer.scheduler.last_epoch == 2


def test_bf16_training_runs_and_learns(tmp_path: Path) -> None:
    cfg = tiny_config(
        tmp_path, "solver.precision=bf16", "solver.max_iter=24", "solver.base_lr=0.02"
    )
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.precision == "bf16"
    trainer.train()
    losses = _losses(tmp_path)
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4


def test_nonfinite_loss_stops_with_iteration_and_image_ids(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(tmp_path, "solver.max_iter=3", "run.checkpoint_period=1"), show_progress=False
    )
    trainer.train()  # a good checkpoint at iteration 3
    good = load_checkpoint(tmp_path / "last.pth")["model"]
    trainer = Trainer(
        tiny_config(tmp_path, "solver.max_iter=6", "run.checkpoint_period=1"),
        resume=True,
        show_progress=False,
    )
    with torch.no_grad():
        trainer.model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"iteration 4 .*image ids \[\d+, \d+\].*"
                       r"the last good checkpoint is .*last\.pth"):
        trainer.train()
    kept = load_checkpoint(tmp_path / "last.pth")
    assert kept["iteration"] == 3
    assert torch.equal(
        kept["model"]["rpn.head.cls_logits.weight"], good["rpn.head.cls_logits.weight"]
    )


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(tmp_path, "solver.max_iter=2", "run.max_nonfinite_skips=1"), show_progress=False
    )
    with torch.no_grad():
        trainer.model.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"no checkpoint was written yet"):
        trainer.train()
    assert trainer.nonfinite_skips == 1
    assert not (tmp_path / "last.pth").exists()


def test_logged_lr_is_the_one_each_step_used(tmp_path: Path) -> None:
    trainer = Trainer(tiny_config(tmp_path, "solver.max_iter=3"), show_progress=False)
    trainer.train()
    logged = [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    # warm-up over 8 steps from 0.1 of base_lr 0.01: steps 0, 1, 2 use 0.1, 0.2125, 0.325 of it
    assert logged == pytest.approx([0.001, 0.002125, 0.00325])


def test_a_skipped_step_keeps_the_schedule_and_is_remembered(tmp_path: Path) -> None:
    trainer = Trainer(
        tiny_config(tmp_path, "solver.max_iter=2", "run.max_nonfinite_skips=5"),
        show_progress=False,
    )
    calls = 0
    forward = trainer.model.forward

    def nan_on_first_call(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        nonlocal calls
        calls += 1
        losses = forward(*args, **kwargs)
        return {k: v * float("nan") for k, v in losses.items()} if calls == 1 else losses

    trainer.model.forward = nan_on_first_call  # type: ignore[method-assign]
    trainer.train()
    state = load_checkpoint(tmp_path / "last.pth")
    assert state["iteration"] == 2 and state["scheduler"]["last_epoch"] == 2
    assert state["nonfinite_skips"] == 1
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert records[0]["loss"] is None and records[1]["loss"] > 0  # JSON has no NaN
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_a_failing_evaluation_leaves_the_checkpoint_of_its_iteration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import maskrcnn.engine.trainer as trainer_module

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("validation failed")

    monkeypatch.setattr(trainer_module, "evaluate", broken)
    trainer = Trainer(
        tiny_config(tmp_path, "solver.max_iter=4", "run.eval_period=2", "run.checkpoint_period=2"),
        show_progress=False,
    )
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.train()
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 2


def test_validation_skips_unreadable_images_when_asked(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "solver.max_iter=1", "data.on_bad_sample=skip")
    trainer = Trainer(cfg, show_progress=False)
    assert trainer.val_set is not None
    broken = trainer.val_set.image_path(0)
    broken.write_bytes(broken.read_bytes()[:100])
    metrics = trainer.train()
    assert 0.0 <= metrics["segm"]["AP"] <= 1.0
    assert (tmp_path / "last.pth").is_file()


def test_resume_warns_about_a_missing_checkpoint_and_a_changed_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="maskrcnn"):
        cfg = tiny_config(tmp_path, "solver.max_iter=1")
        Trainer(cfg, resume=True, show_progress=False).train()
    assert "no checkpoint at" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="maskrcnn"):
        trainer = Trainer(
            tiny_config(tmp_path, "solver.max_iter=2", "solver.base_lr=0.001"),
            resume=True,
            show_progress=False,
        )
    assert trainer.iteration == 1
    assert "solver.base_lr: 0.01 -> 0.001" in caplog.text
    assert "solver.max_iter: 1 -> 2" in caplog.text
    with pytest.raises(CheckpointError, match=r"--resume: .*last\.pth holds a different model "
                       r"than this configuration builds \(size mismatch"):
        Trainer(tiny_config(tmp_path, "model.fpn_channels=32"), resume=True, show_progress=False)


def test_tensorboard_drops_what_a_crashed_run_logged_after_the_checkpoint(
    tmp_path: Path,
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from maskrcnn.engine.logging import MetricsLogger

    first = MetricsLogger(tmp_path)
    for step in range(1, 8):  # the crashed run got to 7; its checkpoint is at 6
        first.log("train", step, {"loss": float(step)})
    first.close()
    time.sleep(1.1)  # event files are named by the second they were opened in
    resumed = MetricsLogger(tmp_path, start=6)
    for step in range(7, 10):
        resumed.log("train", step, {"loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert scalars == [(s, float(s)) for s in range(1, 7)] + [(s, 10.0 * s) for s in (7, 8, 9)]


def test_sample_seeding_leaves_the_samplers_cuda_generators_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each sample's augmentation is seeded on the CPU generator only: reseeding the CUDA
    ones (which the RPN and RoI samplers draw from on a GPU) in evaluation or in a loader
    without workers would make a resumed run differ from a straight one."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    trainer = Trainer(tiny_config(tmp_path, "solver.max_iter=1"), show_progress=False)
    reseeded.clear()
    trainer.train()  # a step (num_workers=0: samples load in this process), then evaluation
    assert reseeded == []


def test_a_new_run_does_not_replace_another_runs_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from maskrcnn.cli.main import main
    from tiny_run import TINY

    Trainer(tiny_config(tmp_path, "solver.max_iter=1"), show_progress=False).train()
    before = (tmp_path / "last.pth").read_bytes()
    with pytest.raises(ValueError, match=r"holds another run \(last\.pth, best\.pth\); continue it "
                       r"with --resume, .* or replace it with run\.overwrite=true"):
        Trainer(tiny_config(tmp_path, "solver.max_iter=2"), show_progress=False)
    argv = ["train", *TINY, f"run.output_dir={tmp_path}", "solver.max_iter=2"]
    # (without a dataset the command runs the demo recipe, which may replace its own runs)
    assert main([*argv, "run.overwrite=false"]) == 2
    assert "holds another run" in capsys.readouterr().err
    assert (tmp_path / "last.pth").read_bytes() == before
    Trainer(tiny_config(tmp_path, "solver.max_iter=2"), resume=True, show_progress=False)
    replaced = Trainer(tiny_config(tmp_path, "solver.max_iter=1", "run.overwrite=true"),
                       show_progress=False)
    replaced.train()
    assert (tmp_path / "last.pth").read_bytes() != before


def test_patience_stops_after_evaluations_without_a_better_mask_ap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import maskrcnn.engine.trainer as trainer_module

    aps = iter([0.5, 0.6, 0.4, 0.55, 0.7])

    def scripted(*args: object, **kwargs: object) -> dict[str, object]:
        ap = next(aps)
        return {t: {"AP": ap, "AP50": ap, "per_class": {}} for t in ("bbox", "segm")}

    monkeypatch.setattr(trainer_module, "evaluate", scripted)
    cfg = tiny_config(tmp_path, "solver.max_iter=20", "run.eval_period=2", "run.patience=2")
    trainer = Trainer(cfg, show_progress=False)
    trainer.train()
    # 0.5, 0.6 (best, iteration 4), 0.4, 0.55: two without gain -> stop at iteration 8.
    assert trainer.iteration == 8 and trainer.best_ap == 0.6
    assert load_checkpoint(tmp_path / "best.pth")["iteration"] == 4
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 8
    assert "early stop at iteration 8" in caplog.text
    assert next(aps) == 0.7  # no evaluation after the stop


def test_a_checkpoint_at_an_evaluation_keeps_the_patience_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import maskrcnn.engine.trainer as trainer_module

    aps = iter([0.5, 0.6, 0.4])

    def scripted(*args: object, **kwargs: object) -> dict[str, object]:
        ap = next(aps)
        return {t: {"AP": ap, "AP50": ap, "per_class": {}} for t in ("bbox", "segm")}

    monkeypatch.setattr(trainer_module, "evaluate", scripted)
    cfg = tiny_config(tmp_path, "solver.max_iter=6", "run.eval_period=2",
                      "run.checkpoint_period=2", "run.patience=5")
    Trainer(cfg, show_progress=False).train()
    state = load_checkpoint(tmp_path / "last.pth")
    assert state["iteration"] == 6 and state["evals_without_gain"] == 1


def test_resume_does_not_need_the_start_weights_again(trained_tiny: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "source.pth"
    shutil.copy(trained_tiny / "last.pth", source)
    cfg = tiny_config(tmp_path / "run", "solver.max_iter=2", "run.checkpoint_period=1",
                      f"model.weights={source}")
    Trainer(cfg, show_progress=False).train()
    source.unlink()  # moved away, or an offline machine without the hub file
    longer = tiny_config(tmp_path / "run", "solver.max_iter=3", f"model.weights={source}")
    resumed = Trainer(longer, resume=True, show_progress=False)
    assert resumed.iteration == 2


def test_validation_loss_is_logged_and_leaves_training_untouched(tmp_path: Path) -> None:
    """``run.val_loss``: the eval records carry the five losses and their sum on the val set;
    the training run itself is the same as without (same weights at the end: the val loss
    draws from its own seeded generator and leaves BatchNorm's statistics alone), and the
    same weights give the same figure twice."""
    from maskrcnn.engine.evaluation import validation_losses

    common = ["solver.max_iter=6", "run.eval_period=3", "model.norm=bn",
              "model.trainable_backbone_layers=5", "run.num_overlays=0"]
    with_loss = Trainer(tiny_config(tmp_path / "a", *common, "run.val_loss=true"),
                        show_progress=False)
    with_loss.train()
    without = Trainer(tiny_config(tmp_path / "b", *common), show_progress=False)
    without.train()
    a, b = with_loss.net.state_dict(), without.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # running statistics included
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["iter"] for r in evals] == [3, 6]
    names = ("loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
             "loss_rpn_box_reg")
    for r in evals:
        assert all(np.isfinite(r[f"val/{n}"]) and r[f"val/{n}"] > 0 for n in names)
        parts = sum(r[f"val/{n}"] for n in names[1:])
        assert r["val/loss"] == pytest.approx(parts, rel=1e-5)
    assert all("val/loss" not in r for r in (json.loads(line) for line in
                                             (tmp_path / "b" / "metrics.jsonl").open()))
    assert with_loss.val_set is not None
    again = validation_losses(with_loss.net, with_loss.val_set, torch.device("cpu"))
    assert again == validation_losses(with_loss.net, with_loss.val_set, torch.device("cpu"))
    assert again["loss"] == pytest.approx(evals[-1]["val/loss"], rel=1e-4)
