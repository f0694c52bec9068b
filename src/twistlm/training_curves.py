"""The training-curve PNG every trainer writes: logged metrics against the step, one panel per metric."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path


def plot_training_curves(log_history: list[dict], path: str | os.PathLike, panels: Sequence[tuple[str, str]]) -> Path:
    """Logged metrics against the step, one panel per ``(key, title)``, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(9, 3 * rows), constrained_layout=True, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (key, title) in zip(axes.flat, panels):
        pts = [(e["step"], e[key]) for e in log_history if key in e and e[key] is not None and math.isfinite(e[key])]
        if pts:
            ax.plot(*zip(*pts), marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
