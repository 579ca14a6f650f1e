"""Checkpoints: written atomically, read without executing code."""

from __future__ import annotations

import glob
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maskrcnn.utils.atomic import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read safely or does not hold what is expected."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, flushed
    to disk, then renamed over the old one. A crash or a full disk at any moment leaves
    either the previous file or the new one, never a half-written one; temporary files left
    by an earlier crash are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A process killed mid-write leaves its temporary file behind; as big as a checkpoint,
    # a few of them fill a disk. Only one process writes a given checkpoint, so any such
    # file is an orphan: remove it before taking more space.
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        orphan.unlink(missing_ok=True)
    try:
        with atomic_write(path, durable=True) as tmp, tmp.open("wb") as f:
            torch.save(state, f)
    except OSError as err:  # a full disk, a read-only folder: one message, the file named
        kept = "the previous checkpoint is kept" if path.is_file() else "nothing was written"
        raise OSError(err.errno, f"{err.strerror or err}; {kept}", str(path)) from None
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain Python values only;
    a file that would run code on load is refused with :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch names the callable it refused to import on a line with "GLOBAL"; other
        # unpickling errors come from bytes that are no pickle at all.
        refused = [line for line in str(err).splitlines() if "GLOBAL" in line]
        if not refused:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (corrupt, or not written by torch.save)"
            ) from None
        raise CheckpointError(
            f"{path} was refused: it holds Python objects other than tensors and plain values "
            f"(loading it could run code). Only load such a file if you trust its origin. "
            f"Details: {refused[0].strip()}"
        ) from None
    except Exception as err:  # on garbage, torch.load raises anything (KeyError, EOFError...)
        detail = str(err) or ("the file ends too early" if isinstance(err, EOFError) else "")
        raise CheckpointError(
            f"{path} is not a readable checkpoint: {type(err).__name__}: {detail}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(state).__name__}")
    return state


def rng_state() -> dict[str, Any]:
    """The state of every random generator the training loop uses, as plain values."""
    np_state: tuple[Any, ...] = np.random.get_state()  # type: ignore[assignment]
    # Lists of ints rather than tensors: they pickle anywhere (torch.distributed gathers them)
    # and load with weights_only=True.
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_lists(value: Any) -> Any:
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value: Any) -> Any:
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value
