"""Long runs do not leak: 500 training iterations (with logging, checkpoints and periodic
evaluation) and 1,000 predictions keep their resident memory flat after warm-up.

RSS is read from ``/proc/self/status`` (Linux). Slow: several minutes on two CPU cores.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from maskrcnn.engine.trainer import Trainer
from maskrcnn.inference.predictor import Predictor
from tiny_run import tiny_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status"),
]

TRAIN_ITERS = 500
WARMUP_ITERS = 100
PREDICTIONS = 1000
WARMUP_PREDICTIONS = 100
# Allowed growth after warm-up; run-to-run noise is about +-40 MB (allocator caches, the
# evaluation's peaks). Caught: anything of 100 KB or more kept per iteration (one batch of
# 96-px float images is 220 KB, a step's autograd graph far more), or one checkpoint (180 MB).
MAX_TRAIN_GROWTH_MB = 40.0
MAX_PREDICT_GROWTH_MB = 20.0


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")




@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[int, float]]]:
    """A 500-iteration run; RSS sampled every 0.2 s as ``(iteration, MB)``."""
    out = tmp_path_factory.mktemp("endurance")
    cfg = tiny_config(out, f"solver.max_iter={TRAIN_ITERS}", "solver.steps=[400]",
                      "run.checkpoint_period=100", "run.eval_period=100")
    trainer = Trainer(cfg, show_progress=False)
    samples: list[tuple[int, float]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            samples.append((trainer.iteration, rss_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    trainer.train()
    done.set()
    sampler.join()
    return out, samples


def _growth(values: list[float]) -> tuple[float, float, float]:
    """(median of the first tenth, median of the last tenth, their difference) in MB."""
    k = max(1, len(values) // 10)
    first, last = statistics.median(values[:k]), statistics.median(values[-k:])
    return first, last, last - first


def test_training_memory_stays_flat(trained: tuple[Path, list[tuple[int, float]]]) -> None:
    _, samples = trained
    steady = [mb for it, mb in samples if WARMUP_ITERS <= it < TRAIN_ITERS]
    assert len(steady) > 50
    first, last, growth = _growth(steady)
    print(f"\ntraining RSS after {WARMUP_ITERS} warm-up iterations: {first:.0f} MB -> "
          f"{last:.0f} MB at {TRAIN_ITERS} (growth {growth:+.1f} MB, peak {max(steady):.0f} MB)")
    assert growth < MAX_TRAIN_GROWTH_MB


def test_prediction_memory_stays_flat(trained: tuple[Path, list[tuple[int, float]]],
                                      tmp_path: Path) -> None:
    out, _ = trained
    # Read from disk, as a user's folder would be: the run's 16 synthetic images, with shapes
    # to detect (the model learnt them), and a few noise images of other sizes.
    files = sorted((out / "data").rglob("*.png"))
    rng = np.random.default_rng(0)
    for k in range(4):
        path = tmp_path / f"noise{k}.png"
        Image.fromarray(rng.integers(0, 256, (48 + 16 * k, 80, 3), dtype=np.uint8)).save(path)
        files.append(path)
    predictor = Predictor.from_checkpoint(out / "last.pth", device="cpu", score_thresh=0.05)
    readings, detections = [], 0
    start = time.perf_counter()
    for k in range(PREDICTIONS):
        prediction = predictor(files[k % len(files)])
        detections += len(prediction)  # type: ignore[arg-type]
        if k >= WARMUP_PREDICTIONS:
            readings.append(rss_mb())
    seconds = time.perf_counter() - start
    first, last, growth = _growth(readings)
    print(f"\nprediction RSS after {WARMUP_PREDICTIONS} warm-up images: {first:.0f} MB -> "
          f"{last:.0f} MB at {PREDICTIONS} (growth {growth:+.1f} MB); {detections} detections, "
          f"{PREDICTIONS / seconds:.0f} images/s")
    assert growth < MAX_PREDICT_GROWTH_MB
