"""Two CPU processes (gloo) under torchrun: same weights as one process with the same global
batch, same AP as single-process evaluation, and no hang when a rank dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maskrcnn.engine.checkpoint import load_checkpoint
from maskrcnn.engine.trainer import Trainer
from tiny_run import TINY, tiny_config

# Every candidate is kept by the samplers, so that which anchors and RoIs a process draws
# does not matter, and square images: one aspect-ratio group.
EXACT = [
    "model.rpn_batch_size_per_image=100000",
    "model.box_batch_size_per_image=100000",
    "solver.grad_clip_norm=null",
    "solver.max_iter=3",
    "data.aspect_ratio_grouping=false",
]


def _train_command(out: Path, nproc: int, *overrides: str) -> list[str]:
    """``maskrcnn train --nproc N`` on the tiny config, writing to ``out``."""
    return [
        sys.executable,
        "-m",
        "maskrcnn",
        "train",
        "--nproc",
        str(nproc),
        "--config",
        str(_empty_config(out)),
        *TINY,
        f"run.output_dir={out}",
        *overrides,
    ]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(
    out: Path, nproc: int, *overrides: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _train_command(out, nproc, *overrides),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path: Path) -> None:
    res = _torchrun(tmp_path / "ddp", 2, *EXACT, "data.batch_size=1", "run.eval_period=3")
    assert res.returncode == 0, res.stderr[-3000:]
    # One process, batch 1, two micro-batches per step: the same 2 images per step, and one
    # thread like each torchrun worker (the thread count changes float summation order).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = Trainer(
        tiny_config(
            tmp_path / "one",
            *EXACT,
            "data.batch_size=1",
            "solver.accumulation_steps=2",
            "run.eval_period=3",
        ),
        show_progress=False,
    )
    try:
        metrics = single.train()
    finally:
        torch.set_num_threads(threads)
    a = load_checkpoint(tmp_path / "ddp" / "last.pth")["model"]
    b = load_checkpoint(tmp_path / "one" / "last.pth")["model"]
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)
    # Distributed evaluation (each rank its shard, gathered) equals single-process AP.
    assert load_checkpoint(tmp_path / "ddp" / "best.pth")["iteration"] == 3
    shared = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert abs(shared[iou_type]["AP"] - metrics[iou_type]["AP"]) < 1e-9


def test_a_dead_rank_ends_the_job_instead_of_hanging(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = _train_command(out, 2, "solver.max_iter=100000", "run.dist_timeout_s=30")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file():  # training has started on both ranks
            assert time.monotonic() < deadline and proc.poll() is None, "training never started"
            time.sleep(0.5)
        workers = _children(proc.pid)
        victim = max(workers)  # one of the two training processes
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        output, _ = proc.communicate(timeout=90)
        assert proc.returncode != 0
        assert time.monotonic() - start < 90
        assert "FAILED" in output or "Signals.SIGKILL" in output or "exitcode" in output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _empty_config(out: Path) -> Path:
    """The library defaults (not the demo recipe that a bare ``maskrcnn train`` picks)."""
    path = out.parent / f"{out.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}\n")
    return path


def _children(pid: int) -> list[int]:
    """Descendants of ``pid`` running the training (torchrun's workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[3]) != pid and b"maskrcnn" in cmdline and _is_descendant(int(stat[3]), pid):
            found.append(int(entry.name))
    return found


def _is_descendant(ppid: int, root: int) -> bool:
    while ppid > 1:
        if ppid == root:
            return True
        try:
            ppid = int(Path(f"/proc/{ppid}/stat").read_text().split()[3])
        except OSError:
            return False
    return False


VOTE = """
import sys, torch
from pathlib import Path
from maskrcnn.engine.distributed import all_ranks_true, init_distributed, shutdown
info = init_distributed(30)
agreed = all_ranks_true(info.rank == 0, info, torch.device("cpu"))  # rank 1: a NaN loss
Path(sys.argv[1], f"{info.rank}.txt").write_text(str(agreed))
shutdown(info)
"""


def test_a_non_finite_loss_in_one_process_is_seen_by_all(tmp_path: Path) -> None:
    """The trainer skips (or stops) in every process when one has a non-finite loss: a
    process that skipped alone would leave the others waiting in the gradient exchange."""
    script = tmp_path / "vote.py"
    script.write_text(VOTE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env=ENV)
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in (0, 1)] == ["False", "False"]


def test_the_launcher_runs_torchrun_with_the_command_less_its_launch_flags(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import maskrcnn.cli.main as cli
    import maskrcnn.cli.train as train_cli

    calls: list[list[str]] = []
    monkeypatch.setattr(train_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    argv = ["train", "--nproc", "2", "--nnodes=2", "--node-rank", "1",
            "--rdzv-endpoint", "node0:29400", "solver.max_iter=5"]
    assert cli.main(argv) == 0
    assert calls == [[
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=2",
        "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:29400",
        "-m", "maskrcnn", "train", "solver.max_iter=5",
    ]]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "2", "--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "must be in 0..1"),
    ],
)
def test_launch_flags_that_would_hang_are_refused(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import maskrcnn.cli.main as cli
    import maskrcnn.cli.train as train_cli

    monkeypatch.setattr(train_cli.subprocess, "call", lambda cmd: pytest.fail(f"launched {cmd}"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.main(["train", *argv]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an abbreviation would reach the workers and relaunch
        cli.main(["train", "--npr", "2"])
