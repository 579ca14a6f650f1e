"""Metrics of a run: one JSON object per line in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends ``{"iter": ..., "kind": "train"|"eval", ...}`` records; scalars also go to
    TensorBoard under ``<kind>/<name>`` (when the tensorboard package is available)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, start: int = 0) -> None:
        """``start``: the iteration a resumed run continues from; TensorBoard drops what a
        crashed run logged after it, as :func:`truncate_after` does for the JSON lines."""
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb: Any = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(
                    str(Path(output_dir) / "tensorboard"), purge_step=start + 1 if start else None
                )
            except ImportError:
                self._tb = None

    def log(self, kind: str, iteration: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "iter": iteration, **{k: _json_value(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, iteration)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _json_value(value: Any) -> Any:
    """NaN and infinities (a skipped step's loss) as ``null``: JSON has no such numbers."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``; a truncated last line (a crash) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: str | Path, iteration: int) -> None:
    """Drop records past ``iteration``: a resumed run rewrites what the crashed one logged
    after its last checkpoint."""
    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if r.get("iter", 0) <= iteration]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
