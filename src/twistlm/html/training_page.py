"""The HTML view of a training run (``training.html`` beside ``training_curve.png``; :mod:`twistlm.trainloop`).

Shows every logged metric against the step — the trainer's curve panels first (loss, log Ẑ, ESS, reward, ... as far
as the history has them), then any other numeric key — the run's configuration, and samples at a few logging steps
when the trainer records them (``TrainLoop.example_samples``).

Data contract::

    {"kind": "training", "title": str, "config": {name: value}, "panels": [[key, title], ...],
     "history": [{"step": int, key: number, ...}, ...],          # the log history as logged
     "samples": [{"step": int, "samples": [{"text": str, name: number, ...}, ...]}, ...]}   # ≤ SNAPSHOTS_SHOWN
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from twistlm.files import atomic_write_text
from twistlm.html.template import render_page

DEFAULT_TITLE = "twistlm training"
SNAPSHOTS_SHOWN = 5
"""Sample snapshots on the page: evenly spaced over the run, the first and the last included."""


def pick_snapshots(snapshots: Sequence[Any], count: int = SNAPSHOTS_SHOWN) -> list[Any]:
    """At most ``count`` items of ``snapshots``, evenly spaced, keeping the first and the last."""
    items = list(snapshots)
    if len(items) <= count:
        return items
    if count <= 1:
        return items[-1:]
    picks = sorted({round(i * (len(items) - 1) / (count - 1)) for i in range(count)})
    return [items[i] for i in picks]


def _plain(value: Any) -> Any:
    """A config value as the page shows it: JSON scalars and containers as they are, anything else as text."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


def training_data(history: Sequence[Mapping[str, Any]], panels: Sequence[tuple[str, str]],
                  samples: Sequence[Mapping[str, Any]] = (), config: Mapping[str, Any] | None = None,
                  title: str = DEFAULT_TITLE) -> dict:
    """The data the training page embeds (module docstring)."""
    return {
        "kind": "training",
        "title": title,
        "config": {str(k): _plain(v) for k, v in (config or {}).items()},
        "panels": [[key, label] for key, label in panels],
        "history": [dict(e) for e in history],
        "samples": [dict(s) for s in pick_snapshots(samples)],
    }


def write_training_page(path: str | os.PathLike, history: Sequence[Mapping[str, Any]],
                        panels: Sequence[tuple[str, str]], samples: Sequence[Mapping[str, Any]] = (),
                        config: Mapping[str, Any] | None = None, title: str = DEFAULT_TITLE) -> Path:
    """Write the training page to ``path`` atomically; returns the path."""
    return atomic_write_text(path, render_page("training", title, training_data(history, panels, samples, config, title)))
