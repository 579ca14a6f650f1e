"""The training loop: SGD steps over micro-batches, periodic evaluation and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from maskrcnn.config import DataConfig, TrainConfig, to_dict
from maskrcnn.data.errors import DatasetError
from maskrcnn.data.loader import build_loader
from maskrcnn.data.repeat_factor import repeat_factors
from maskrcnn.engine.batches import training_loader
from maskrcnn.engine.build import (
    build_datasets,
    build_model,
    class_loss_weights,
    resolve_model_config,
    synthetic_data,
)
from maskrcnn.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from maskrcnn.engine.distributed import (
    all_ranks_true,
    barrier,
    device_for,
    gather_objects,
    init_distributed,
)
from maskrcnn.engine.evaluation import evaluate, validation_losses
from maskrcnn.engine.logging import MetricsLogger, read_metrics, truncate_after
from maskrcnn.engine.plots import plot_ap, plot_losses
from maskrcnn.engine.solver import build_optimizer, build_scheduler, effective_lr
from maskrcnn.model.norms import sync_batchnorm
from maskrcnn.utils.precision import autocast, grad_scaler, resolve_precision

log = logging.getLogger("maskrcnn")
CALIBRATION_FILE = "calibration.json"  # training images for int8 calibration (see below)
CALIBRATION_IMAGES = 32


def spread(n: int, count: int) -> list[int]:
    """``count`` indices of ``range(n)`` evenly spread from first to last (all when
    ``n <= count``), increasing and distinct."""
    if n <= count:
        return list(range(n))
    return [round(i * (n - 1) / max(1, count - 1)) for i in range(count)]


def write_calibration_list(dataset: Any, path: Path, count: int = CALIBRATION_IMAGES) -> None:
    """``{"images": [...]}``: up to ``count`` training images, spread over the set, as
    absolute paths: what ``--fast-precision int8`` calibrates on when no ``--calibration``
    folder is given."""
    files = []
    for k in spread(len(dataset), count):
        with contextlib.suppress(DatasetError):
            files.append(str(dataset.image_path(k).resolve()))
    path.write_text(json.dumps({"images": files}, indent=1))


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite."""


class Trainer:
    """Trains ``cfg`` end to end; ``resume=True`` continues from ``<output_dir>/last.pth``."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        show_progress: bool = True,
        net: torch.nn.Module | None = None,
    ) -> None:
        """``net``: a model to train in place of the one ``cfg.model`` describes, taking the
        same inputs and returning the same losses and detections (the accuracy benchmark
        trains torchvision's Mask R-CNN through this loop); it must match the dataset's
        number of classes."""
        self.dist = init_distributed(cfg.run.dist_timeout_s)
        if cfg.data.train_json is None:
            cfg = dataclasses.replace(cfg, data=self.synthetic(cfg))
        self.out = Path(cfg.run.output_dir)
        if not resume and not cfg.run.overwrite:
            refuse_to_replace(self.out)
        if not resume and cfg.run.overwrite and self.dist.is_main:
            for name in ("last.pth", "best.pth", "metrics.json", CALIBRATION_FILE):  # the old run's
                (self.out / name).unlink(missing_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = device_for(self.dist, cfg.run.device)
        torch.manual_seed(cfg.run.seed)
        self.train_set, self.val_set = build_datasets(cfg.data)
        cfg = dataclasses.replace(
            cfg, model=resolve_model_config(cfg.model, self.train_set.class_names)
        )
        self.cfg = cfg
        self.precision = resolve_precision(cfg.solver.precision, self.device)
        # A resumed run takes every tensor from last.pth: the start weights are not needed.
        start = cfg.model
        if resume and (self.out / "last.pth").is_file():
            start = dataclasses.replace(start, weights=None)
        self.net: torch.nn.Module = (
            build_model(start, self.device, self.train_set.class_names)
            if net is None
            else net.to(self.device)
        )
        if cfg.model.class_loss_weights:
            weights = class_loss_weights(cfg.model.class_loss_weights, self.train_set.class_names)
            heads = self.net.roi_heads
            assert isinstance(heads, torch.nn.Module)
            heads.class_weights = weights.to(self.device)
            log.info("classification loss weights: %s", ", ".join(
                f"{n} {w:g}" for n, w in zip(self.train_set.class_names, weights.tolist(),
                                             strict=True) if w != 1.0))
        if self.device.type == "cpu":
            # oneDNN's convolutions and the RoIAlign gathers (model/pooler.py) are fastest on
            # NHWC activations: 20-25 % per step (docs/performance.md).
            self.net.to(memory_format=torch.channels_last)
        if cfg.model.norm == "syncbn":
            sync_batchnorm(self.net, self.device, self.dist.world_size)
        self.model: torch.nn.Module = self.net
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.net, device_ids=ids)
        lr = effective_lr(cfg.solver, cfg.data.batch_size, self.dist.world_size)
        self.optimizer = build_optimizer(self.net, cfg.solver, lr)
        self.scheduler = build_scheduler(self.optimizer, cfg.solver)
        self.scaler = grad_scaler(self.precision, self.device)
        self.loader = self.build_loader()
        self.iteration, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.best_ap, self.skipped_samples, self.nonfinite_skips = -1.0, 0, 0
        self.evals_without_gain, self.stop_announced = 0, False  # for run.patience
        self.last_metrics: dict[str, Any] = {}
        self.show_progress = show_progress and self.dist.is_main
        # Ranks draw different anchors and RoIs; data augmentation is seeded per sample.
        torch.manual_seed(cfg.run.seed + self.dist.rank)
        if resume:
            self.resume()
        self.logger = MetricsLogger(self.out, enabled=self.dist.is_main, start=self.iteration)
        if self.dist.is_main:
            truncate_after(self.logger.path, self.iteration)
            (self.out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def synthetic(self, cfg: TrainConfig) -> DataConfig:
        """The embedded dataset, generated once by the main process."""
        if self.dist.is_main:
            data = synthetic_data(cfg)
        barrier(self.dist)
        return data if self.dist.is_main else synthetic_data(cfg)

    def build_loader(self) -> DataLoader[Any]:
        d = self.cfg.data
        factors = None
        if d.repeat_factor_threshold > 0:
            factors = repeat_factors(self.train_set.image_labels(), d.repeat_factor_threshold)
            log.info(
                "repeat-factor sampling (threshold %g): %.0f images an epoch instead of %d, "
                "%d images repeated", d.repeat_factor_threshold, sum(factors), len(factors),
                sum(f > 1 for f in factors),
            )
        base = build_loader(
            self.train_set,
            d.batch_size,
            shuffle=True,
            num_workers=d.num_workers,
            aspect_ratio_grouping=d.aspect_ratio_grouping,
            seed=self.cfg.run.seed,
            drop_last=True,
            distributed=self.dist.enabled,
            num_replicas=self.dist.world_size,
            rank=self.dist.rank,
            repeat_factors=factors,
        )
        return training_loader(base, self.cfg.run.seed, d.on_bad_sample == "skip")

    def batches(self) -> Generator[tuple[list[Tensor], list[dict[str, Any]]], None, None]:
        """Micro-batches forever, epoch after epoch, starting where a resumed run stopped."""
        sampler = self.loader.batch_sampler
        while True:
            sampler.set_epoch(self.epoch, skip=self.batch_in_epoch)  # type: ignore[union-attr]
            start, used = self.batch_in_epoch, 0
            for images, targets, bad in self.loader:
                self.batch_in_epoch += 1
                for sample in bad:
                    self.skipped_samples += 1
                    log.warning("skipped sample %d: %s", sample.index, sample.message)
                if images:
                    used += 1
                    yield images, targets
            if start == 0 and not used:  # a whole epoch skipped: the next ones would be too
                raise DatasetError(
                    f"{self.cfg.data.train_json}: every training image of epoch {self.epoch} "
                    f"was skipped as unreadable ({self.skipped_samples} skipped samples in "
                    "all; see the warnings above); nothing can be trained on"
                )
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def train(self) -> dict[str, Any]:
        """Run to ``solver.max_iter``; returns the last evaluation's metrics."""
        s, r = self.cfg.solver, self.cfg.run
        self.model.train()
        stream = self.batches()
        # As a context, the bar ends its line before an error is printed; closing the stream
        # shuts the loader's workers down here rather than whenever the iterator is collected.
        with tqdm(total=s.max_iter, initial=self.iteration, desc="train", dynamic_ncols=True,
                  disable=not self.show_progress) as bar, contextlib.closing(stream):
            while self.iteration < s.max_iter and not self.out_of_patience():
                lr = self.optimizer.param_groups[0]["lr"]  # this step's, before it moves
                losses = self.step(stream)
                self.iteration += 1
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}")
                bar.update(1)
                self.after_step(losses, lr)
        evaluated = r.eval_period and self.iteration % r.eval_period == 0
        if self.val_set is not None and not evaluated:
            self.run_evaluation()
        self.finish()
        return self.last_metrics

    def after_step(self, losses: dict[str, float], lr: float) -> None:
        """The log record, the checkpoint and the evaluation due at this iteration. The
        checkpoint comes first: an evaluation that fails must not cost the training."""
        s, r = self.cfg.solver, self.cfg.run
        last = self.iteration == s.max_iter
        if self.iteration % r.log_period == 0 or last:
            self.logger.log("train", self.iteration, {**losses, "lr": lr, "epoch": self.epoch})
        checkpoint = self.iteration % r.checkpoint_period == 0 or last
        if checkpoint:
            self.save(self.out / "last.pth")
        if r.eval_period and self.iteration % r.eval_period == 0:
            self.run_evaluation()
            if checkpoint:  # again, so that a resumed run knows the best AP and the patience
                self.save(self.out / "last.pth")

    def step(self, stream: Iterator[tuple[list[Tensor], list[dict[str, Any]]]]) -> dict[str, float]:
        """One optimiser step over ``accumulation_steps`` micro-batches; the gradient is that
        of the mean of their losses. Returns the losses averaged over the micro-batches."""
        k = self.cfg.solver.accumulation_steps
        totals: dict[str, float] = {}
        self.optimizer.zero_grad(set_to_none=True)
        for micro in range(k):
            images, targets = next(stream)
            images = [im.to(self.device, non_blocking=True) for im in images]
            targets = [
                {n: v.to(self.device) if isinstance(v, Tensor) else v for n, v in t.items()}
                for t in targets
            ]
            # DDP averages gradients across processes on the last micro-batch only.
            sync = micro == k - 1 or not self.dist.enabled
            no_sync: Any = contextlib.nullcontext() if sync else self.model.no_sync()  # type: ignore[operator]
            with no_sync:
                with autocast(self.precision, self.device):
                    losses = self.model(images, targets)
                loss = sum(losses.values())
                assert isinstance(loss, Tensor)
                # All processes skip together (or stop together): one that skipped alone
                # would leave the others waiting in the gradient exchange.
                if not all_ranks_true(bool(torch.isfinite(loss)), self.dist, self.device):
                    self.nonfinite(losses, targets)
                    self.skip_schedule_step()
                    return {"loss": float("nan")}
                self.scaler.scale(loss / k).backward()
            for name, value in {**losses, "loss": loss}.items():
                totals[name] = totals.get(name, 0.0) + float(value.detach()) / k
        if self.cfg.solver.grad_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.solver.grad_clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return totals

    def skip_schedule_step(self) -> None:
        """Advance the schedule over a skipped step: it follows the iteration count."""
        with warnings.catch_warnings():  # "scheduler stepped before optimizer": on purpose
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def nonfinite(self, losses: dict[str, Tensor], targets: list[dict[str, Any]]) -> None:
        """Stop with a message naming the iteration and images, or skip the step when
        ``run.max_nonfinite_skips`` allows it."""
        ids = [t.get("image_id") for t in targets]
        bad = {
            n: float(v.detach()) for n, v in losses.items() if not math.isfinite(float(v.detach()))
        }
        where = f"{bad} on image ids {ids}" if bad else "in another process"
        last = self.out / "last.pth"
        saved = f"the last good checkpoint is {last}" if last.is_file() else (
            "no checkpoint was written yet (run.checkpoint_period)"
        )
        message = f"non-finite loss at iteration {self.iteration + 1} {where}; {saved}"
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_skips < self.cfg.run.max_nonfinite_skips:
            self.nonfinite_skips += 1
            log.warning(
                "%s (step skipped, %d of %d allowed)",
                message,
                self.nonfinite_skips,
                self.cfg.run.max_nonfinite_skips,
            )
            return
        raise NonFiniteLossError(message)

    def run_evaluation(self) -> dict[str, Any]:
        """COCO AP on the validation set; keeps ``best.pth`` by mask AP; writes overlays."""
        if self.val_set is None:
            return {}
        metrics = evaluate(
            self.net,
            self.val_set,
            self.device,
            batch_size=self.cfg.data.batch_size,
            overlay_dir=self.out / "overlays",
            num_overlays=self.cfg.run.num_overlays,
            show_progress=self.show_progress,
            dist=self.dist,
            skip_bad=self.cfg.data.on_bad_sample == "skip",
        )
        self.model.train()
        flat = {
            f"{t}/{k}": v
            for t in ("bbox", "segm")
            for k, v in metrics[t].items()
            if k != "per_class"
        }
        if self.cfg.run.val_loss:
            losses = validation_losses(
                self.net, self.val_set, self.device, batch_size=self.cfg.data.batch_size,
                precision=self.precision, dist=self.dist,
                skip_bad=self.cfg.data.on_bad_sample == "skip",
            )
            metrics["val_loss"] = losses
            flat.update({f"val/{k}": v for k, v in losses.items()})
        self.logger.log("eval", self.iteration, flat)
        self.last_metrics = metrics
        if metrics["segm"]["AP"] > self.best_ap:
            self.best_ap = metrics["segm"]["AP"]
            self.evals_without_gain = 0
            self.save(self.out / "best.pth")
        else:
            self.evals_without_gain += 1
        return metrics

    def out_of_patience(self) -> bool:
        """Whether ``run.patience`` evaluations in a row brought no better mask AP; says so
        (and saves ``last.pth`` at this iteration) the first time."""
        patience = self.cfg.run.patience
        if not patience or self.evals_without_gain < patience:
            return False
        if not self.stop_announced:
            self.stop_announced = True
            log.warning(
                "early stop at iteration %d: mask AP has not improved for %d evaluations "
                "(best %.4f, kept in best.pth)", self.iteration, patience, self.best_ap,
            )
            self.save(self.out / "last.pth")
        return True

    def finish(self) -> None:
        """Plots and metrics.json in the run folder (by the main process)."""
        if not self.dist.is_main:
            return
        records = read_metrics(self.logger.path)
        plot_losses(records, self.out / "loss_curves.png")
        if any(r["kind"] == "eval" for r in records):
            plot_ap(records, self.out / "ap_curve.png")
        if self.last_metrics:
            (self.out / "metrics.json").write_text(json.dumps(self.last_metrics, indent=2))
        write_calibration_list(self.train_set, self.out / CALIBRATION_FILE)
        self.logger.close()

    def state(self) -> dict[str, Any]:
        return {
            "model": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best_ap": self.best_ap,
            "evals_without_gain": self.evals_without_gain,
            "skipped_samples": self.skipped_samples,
            "nonfinite_skips": self.nonfinite_skips,
            "rng": self.rng_states(),
            "config": to_dict(self.cfg),
            "class_names": list(self.train_set.class_names),
            "label_to_cat_id": dict(self.train_set.label_to_cat_id),
        }

    def rng_states(self) -> list[dict[str, Any]]:
        """Every process's random state (a collective call: all ranks take part)."""
        return gather_objects(rng_state(), self.dist)

    def save(self, path: Path) -> None:
        """Only the main process writes; all gather their RNG states for it."""
        state = self.state()
        if self.dist.is_main:
            save_checkpoint(state, path)

    def resume(self) -> None:
        """Continue from ``last.pth`` if the run folder has one (a first launch of a job that
        is restarted with ``--resume`` has none, and starts afresh)."""
        path = self.out / "last.pth"
        if not path.is_file():
            log.warning("--resume: no checkpoint at %s; starting a new run", path)
            return
        state = self.load(path)
        saved = flatten(state.get("config", {}))
        changed = {k: (saved[k], v) for k, v in flatten(to_dict(self.cfg)).items()
                   if k in saved and saved[k] != v}
        if changed:
            log.warning(
                "--resume: the configuration differs from the checkpoint's (the optimizer "
                "and schedule state, e.g. the learning rate, come from the checkpoint): %s",
                ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()),
            )

    def load(self, path: Path) -> dict[str, Any]:
        state = load_checkpoint(path, map_location=self.device)
        try:
            self.net.load_state_dict(state["model"])
        except RuntimeError as err:  # another architecture or number of classes
            detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
            raise CheckpointError(
                f"--resume: {path} holds a different model than this configuration builds "
                f"({detail}); resume with the settings it was trained with, or start a new "
                "run.output_dir"
            ) from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.epoch = state["iteration"], state["epoch"]
        self.batch_in_epoch, self.best_ap = state["batch_in_epoch"], state["best_ap"]
        self.skipped_samples = state.get("skipped_samples", 0)
        self.evals_without_gain = state.get("evals_without_gain", 0)
        self.nonfinite_skips = state.get("nonfinite_skips", 0)
        rngs = state["rng"]
        # A run resumed with as many processes as it had continues every stream exactly.
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return state


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"solver": {"base_lr": 0.02}}`` as ``{"solver.base_lr": 0.02}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def refuse_to_replace(out: Path) -> None:
    """A ValueError when ``out`` holds another run's checkpoint: a new run would overwrite
    its ``last.pth`` and leave its ``metrics.json`` beside a different model."""
    found = [name for name in ("last.pth", "best.pth") if (out / name).is_file()]
    if found:
        raise ValueError(
            f"{out} holds another run ({', '.join(found)}); continue it with --resume, start "
            "this one elsewhere (run.output_dir=...), or replace it with run.overwrite=true"
        )
