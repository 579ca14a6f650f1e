"""Training curves as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: Any, ax: Any, title: str, path: str | Path) -> Path:
    """Iterations on x, a grid, the legend and ``title``; written to ``path`` and closed."""
    ax.set_xlabel("iteration")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_losses(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Every ``loss*`` series of the train records against the iteration, log scale, and
    the validation loss of the eval records (``run.val_loss``) as dots."""
    train = [r for r in records if r.get("kind") == "train"]
    names = sorted({k for r in train for k in r if k.startswith("loss")})
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        logged = [r for r in train if r.get(name) is not None]  # null: a skipped step
        ax.plot(
            [r["iter"] for r in logged],
            [r[name] for r in logged],
            label=name,
            linewidth=2.5 if name == "loss" else 1.2,
        )
    val = [r for r in records if r.get("kind") == "eval" and r.get("val/loss") is not None]
    if val:
        ax.plot([r["iter"] for r in val], [r["val/loss"] for r in val], "o-", color="black",
                label="validation loss", linewidth=2.5)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    return _save(fig, ax, "training losses", path)


def plot_ap(records: list[dict[str, Any]], path: str | Path) -> Path:
    """Box and mask AP (and AP50) of the eval records against the iteration."""
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, style in (
        ("bbox/AP", "-o"),
        ("segm/AP", "-s"),
        ("bbox/AP50", "--"),
        ("segm/AP50", ":"),
    ):
        xs = [r["iter"] for r in evals if key in r]
        ax.plot(xs, [r[key] for r in evals if key in r], style, label=key)
    ax.set_ylabel("AP")
    ax.set_ylim(0, 1)
    return _save(fig, ax, "validation AP", path)
