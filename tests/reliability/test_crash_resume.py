"""Crashes mid-training lose nothing: ``maskrcnn train`` killed with SIGKILL (also in the
middle of writing a checkpoint) resumes with ``--resume`` to the very weights of a run that
was never interrupted, every checkpoint seen on disk loads, and a full disk while saving
keeps the previous checkpoint."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from maskrcnn.cli.main import main
from maskrcnn.data.synthetic import make_synthetic_coco
from maskrcnn.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from maskrcnn.engine.trainer import Trainer
from tiny_run import TINY, tiny_config

SEED = 1234
TMP_GLOB = ".last.pth.*.tmp"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 synthetic images, no validation set: no evaluation, only training and saving."""
    return make_synthetic_coco(tmp_path_factory.mktemp("crash_data"), 12, size=64, seed=0)


def _overrides(dataset: Path, out: Path, max_iter: int) -> list[str]:
    # 64 FPN channels: a 40 MB checkpoint instead of 180 MB, written every iteration.
    return [*TINY, "model.fpn_channels=64", f"run.output_dir={out}", f"data.train_json={dataset}",
            f"data.train_images={dataset.parent}", f"solver.max_iter={max_iter}",
            "solver.steps=[5]", "run.checkpoint_period=1"]


def _start(dataset: Path, out: Path, max_iter: int, resume: bool) -> subprocess.Popen[bytes]:
    out.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "maskrcnn", "train", *_overrides(dataset, out, max_iter)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with (out / "child.log").open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen([*argv, *(["--resume"] if resume else [])], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def _log_tail(out: Path) -> str:
    return (out / "child.log").read_text(errors="replace")[-3000:]


@dataclass(frozen=True)
class Kill:
    """When to SIGKILL a child: ``write`` while its ``n``-th checkpoint is being written;
    ``step`` a fraction ``frac`` of an iteration after its ``n``-th checkpoint (``n >= 2``;
    computing or writing); ``startup`` a fraction ``frac`` of its start-up (imports, model,
    resume)."""

    mode: str
    n: int = 0
    frac: float = 0.0


@dataclass
class Watch:
    """What the watcher saw of one child: the checkpoints it loaded while the child ran."""

    iterations_seen: list[int] = field(default_factory=list)
    killed_mid_write: bool = False
    kept_iteration: int = 0  # of the last.pth on disk when the child was gone
    startup_s: float | None = None  # from the start to its first checkpoint


def _watch(proc: subprocess.Popen[bytes], out: Path, plan: Kill | None,
           startup_s: float = 4.0) -> Watch:
    """Poll ``out`` until the child ends; load every new ``last.pth`` (it must always load)
    and SIGKILL the child as ``plan`` says. Times are measured, not assumed: the machine
    may be idle or busy."""
    started = time.monotonic()
    orphans = {p.name for p in out.glob(TMP_GLOB)}  # left by an earlier kill
    watch, writes, last_tmp = Watch(), 0, ""
    last_stat = _stat(out / "last.pth")
    saved: list[float] = []  # when each new checkpoint was seen
    deadline = started + plan.frac * startup_s if plan and plan.mode == "startup" else None

    def kill() -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        watch.killed_mid_write = any(p.name not in orphans for p in out.glob(TMP_GLOB))

    while proc.poll() is None:
        now = time.monotonic()
        tmps = sorted(p.name for p in out.glob(TMP_GLOB) if p.name not in orphans)
        if tmps and tmps[-1] != last_tmp:
            last_tmp, writes = tmps[-1], writes + 1
            if plan and plan.mode == "write" and writes == plan.n:
                kill()
                break
        if deadline is not None and now > deadline:
            kill()
            break
        # Loading takes a while: not just before the write to kill in, so as not to miss it.
        busy = plan is not None and plan.mode == "write" and writes >= plan.n - 1
        stat = None if busy else _stat(out / "last.pth")
        if stat is not None and stat != last_stat:
            last_stat = stat
            saved.append(now)
            watch.startup_s = watch.startup_s or now - started
            if plan and plan.mode == "step" and len(saved) == plan.n:
                period = saved[-1] - saved[-2]  # n >= 2: one iteration, save included
                deadline = now + plan.frac * period
            # os.replace is atomic: whatever is at last.pth now is a whole checkpoint.
            watch.iterations_seen.append(load_checkpoint(out / "last.pth")["iteration"])
        time.sleep(0.002)
    return watch


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def _reference(dataset: Path, out: Path, max_iter: int) -> dict[str, torch.Tensor]:
    from maskrcnn.config import load_train_config

    cfg = load_train_config(None, [*_overrides(dataset, out, max_iter),
                                   "run.checkpoint_period=100000"])
    Trainer(cfg, show_progress=False).train()
    return load_checkpoint(out / "last.pth")["model"]  # type: ignore[no-any-return]


def _assert_same_weights(got: dict[str, Any], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)


def _crash_and_resume(dataset: Path, out: Path, max_iter: int, kills: list[Kill]) -> list[Watch]:
    """Run to ``max_iter``, killing the child once per entry of ``kills`` and resuming."""
    watches: list[Watch] = []
    startup_s = 4.0
    for k, plan in enumerate(kills):
        proc = _start(dataset, out, max_iter, resume=k > 0)
        watch = _watch(proc, out, plan, startup_s)
        startup_s = watch.startup_s or startup_s
        assert proc.returncode == -signal.SIGKILL, f"the child was not killed:\n{_log_tail(out)}"
        assert watch.iterations_seen == sorted(watch.iterations_seen)
        if (out / "last.pth").exists():  # after the kill, whatever is there loads
            watch.kept_iteration = load_checkpoint(out / "last.pth")["iteration"]
        watches.append(watch)
    proc = _start(dataset, out, max_iter, resume=True)
    final = _watch(proc, out, None)
    assert proc.returncode == 0, _log_tail(out)
    watches.append(final)
    return watches


def test_killed_mid_checkpoint_write_resumes_to_the_same_weights(tmp_path: Path,
                                                                 dataset: Path) -> None:
    max_iter = 5
    kill_at = random.Random(SEED).randint(2, max_iter - 2)  # the write of iteration kill_at
    want = _reference(dataset, tmp_path / "straight", max_iter)
    out = tmp_path / "crashed"
    first, final = _crash_and_resume(dataset, out, max_iter, [Kill("write", kill_at)])
    assert first.killed_mid_write, "the kill came after the write had finished"
    # The interrupted write left its temporary file; last.pth is the previous checkpoint.
    assert first.kept_iteration == kill_at - 1
    assert final.iterations_seen[-1] == max_iter
    state = load_checkpoint(out / "last.pth")
    assert state["iteration"] == max_iter
    _assert_same_weights(state["model"], want)
    assert not list(out.glob(TMP_GLOB)), "the orphaned temporary file was not cleaned up"


@pytest.mark.slow
def test_repeated_kills_at_random_moments_lose_nothing(tmp_path: Path, dataset: Path) -> None:
    max_iter = 16
    rng = random.Random(SEED + 1)
    # Mid-write, mid-iteration and mid-start-up, twice each: at most 3 iterations of
    # progress per child, so the run cannot finish before the last kill.
    kills = [Kill("write", rng.randint(2, 3)), Kill("step", rng.randint(2, 3), rng.random()),
             Kill("startup", 0, rng.uniform(0.1, 0.9)), Kill("write", rng.randint(2, 3)),
             Kill("step", rng.randint(2, 3), rng.random()),
             Kill("startup", 0, rng.uniform(0.1, 0.9))]
    want = _reference(dataset, tmp_path / "straight", max_iter)
    out = tmp_path / "crashed"
    watches = _crash_and_resume(dataset, out, max_iter, kills)
    print(f"\nkills survived: {len(kills)}, of which mid-write: "
          f"{sum(w.killed_mid_write for w in watches[:-1])}; iteration on disk after each: "
          f"{[w.kept_iteration for w in watches[:-1]]}; checkpoints loaded while running: "
          f"{sum(len(w.iterations_seen) for w in watches)}")
    # (A kill may land after the last save, while the child writes its plots: then the
    # final --resume has nothing left to do.)
    state = load_checkpoint(out / "last.pth")
    assert state["iteration"] == max_iter
    _assert_same_weights(state["model"], want)
    assert not list(out.glob(TMP_GLOB))


# --- a full disk -------------------------------------------------------------------------


def _full_disk(*args: Any, **kwargs: Any) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _save_part_then_fill_the_disk(state: Any, f: Any, *args: Any, **kwargs: Any) -> None:
    f.write(b"PK\x03\x04" + b"\0" * 4096)  # some of the file got out
    _full_disk()


@pytest.mark.parametrize("where", ["torch.save", "os.fsync"])
def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "w": torch.arange(5.0)}, path)
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", _save_part_then_fill_the_disk)
    else:  # some file systems report a full disk only when flushing
        monkeypatch.setattr(os, "fsync", _full_disk)
    with pytest.raises(OSError) as info:
        save_checkpoint({"iteration": 2, "w": torch.zeros(5)}, path)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["iteration"] == 1 and state["w"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]


def test_training_that_hits_a_full_disk_stops_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: Path
) -> None:
    saves = 0
    real_save = torch.save

    def save_once_then_full(state: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal saves
        saves += 1
        if saves > 1:
            _save_part_then_fill_the_disk(state, f)
        real_save(state, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_once_then_full)
    cfg = tiny_config(tmp_path, f"data.train_json={dataset}",
                      f"data.train_images={dataset.parent}", "solver.max_iter=2",
                      "run.checkpoint_period=1", "model.fpn_channels=64")
    with pytest.raises(OSError, match="No space left"):
        Trainer(cfg, show_progress=False).train()
    monkeypatch.undo()  # space freed
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 1
    assert not list(tmp_path.glob(TMP_GLOB))
    resumed = Trainer(cfg, resume=True, show_progress=False)
    assert resumed.iteration == 1
    resumed.train()
    assert load_checkpoint(tmp_path / "last.pth")["iteration"] == 2


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "json"])
def test_a_damaged_last_checkpoint_is_an_error_not_a_fresh_start(
    tmp_path: Path, dataset: Path, damage: str
) -> None:
    # Copied by hand, or written by another tool without the atomic rename: resuming must
    # say so rather than silently start again from iteration 0.
    cfg = tiny_config(tmp_path, f"data.train_json={dataset}",
                      f"data.train_images={dataset.parent}", "solver.max_iter=1")
    path = tmp_path / "last.pth"
    save_checkpoint({"iteration": 1, "w": torch.zeros(1000)}, path)
    data = path.read_bytes()
    # torch.load fails on these with RuntimeError, EOFError, KeyError, UnpicklingError.
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                      "text": b"hello world", "json": b'{"iteration": 1}'}[damage])
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is not a readable checkpoint")):
        Trainer(cfg, resume=True, show_progress=False)


def test_the_train_command_reports_a_full_disk_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dataset: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(torch, "save", _save_part_then_fill_the_disk)
    argv = ["train", *TINY, f"data.train_json={dataset}", f"data.train_images={dataset.parent}",
            "solver.max_iter=1", "run.checkpoint_period=1", "model.fpn_channels=64",
            f"run.output_dir={tmp_path}"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last == f"error: {tmp_path / 'last.pth'}: No space left on device; nothing was written"
    assert "Traceback" not in err
