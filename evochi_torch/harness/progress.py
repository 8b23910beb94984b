"""What a person watching a training sees: one line per epoch, and the learning curve."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_duration", "plot_curve", "progress_line"]

log = logging.getLogger("evochi_torch.harness")
_warned = False


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(row: Mapping[str, Any], done: float | None = None) -> str:
    """``epoch   12  center  480.0  pop mean  231.5 max  500.0  12,345 steps/s  ETA 0:41``.

    `done` is the fraction of the budget (epochs or env steps) spent; it gives the ETA.
    """
    parts = [f"epoch {row['epoch']:5d}"]
    if row.get("center_score") is not None:
        parts.append(f"center {row['center_score']:9.2f}")
    parts.append(f"pop mean {row['reward_mean']:9.2f} max {row['reward_max']:9.2f}")
    if row.get("env_steps") is not None:
        exact = "" if row.get("env_steps_exact", 1) else "*"
        parts.append(f"env steps {row['env_steps']:>10,}{exact}")
    if row.get("steps_per_s") is not None:
        parts.append(f"{row['steps_per_s']:>9,.0f} steps/s")
    else:
        parts.append(f"{row['members_per_s']:>8,.1f} members/s")
    if done is not None and 0 < done < 1:
        parts.append(f"ETA {format_duration(row['seconds'] * (1 - done) / done)}")
    return "  ".join(parts)


def plot_curve(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Center score (when evaluated) and population mean against env steps (or epochs)."""
    try:
        import matplotlib
    except ImportError:
        global _warned
        if not _warned:
            _warned = True
            log.warning("no curve.png: matplotlib is not installed (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_steps = all(r.get("env_steps") is not None for r in rows)
    x_key = "env_steps" if by_steps else "epoch"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    scored = [r for r in rows if r.get("center_score") is not None]
    if scored:
        ax.plot([r[x_key] for r in scored], [r["center_score"] for r in scored], label="center")
    ax.plot([r[x_key] for r in rows], [r["reward_mean"] for r in rows], alpha=0.7,
            label="population mean (training reward)")  # fmt: skip
    ax.set(xlabel=x_key.replace("_", " "), ylabel="score", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
