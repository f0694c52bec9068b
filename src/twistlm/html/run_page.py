"""The HTML view of an SMC run (``twistlm sample --html``, :meth:`twistlm.result.SMCResult.to_html`).

One self-contained page (see :mod:`twistlm.html.template`) with, per prompt: the final particles (normalised
weight, log w, log φ, how they ended, the initial particle they descend from, the text with tool-spliced tokens
marked), the ESS trace with the resampling events, log Ẑ, the ancestry plot, a step view (slider) of every particle's
text and weight at each t and, for twisted runs, log ψ of the chosen tokens. Without a :class:`~twistlm.trace.SMCTrace`
the page shows what the result alone holds (final particles, ESS, ancestry) and says how to get the step view.

Data contract (``read_page_data(page)``; all per-step data compact, texts never repeated per step)::

    {"kind": "run", "title": str, "settings": {name: value},
     "vocab": [token text, ...], "vocab_ids": [token id, ...],        # the token table (trace runs only)
     "runs": [{                                                        # one per prompt
        "prompt": str, "K": int, "n": steps run,
        "log_z": float, "texts": [K], "log_w": [K], "w": [K] (normalised, sum 1), "log_phi": [K],
        "eos": [K] bool, "lineage": [K] (= SMCResult.lineage()),
        "ess": [n], "resampled_at": [steps t], "ancestors": [[K] per event] (new slot k ← old slot ancestors[i][k]),
        "ids": [[vocab index, ...] per final particle] | null,
        "trace": null | {"tok": [n][K] vocab index or −1 (already finished),
                         "logw": [n][K] W after step t (null: weight zero), "forced": [n][tool-forced slots],
                         "psi": [n][K] log ψ_t of the chosen token (null where finished) | null}}]}

Slot k at step t continues slot ``ancestors[i][k]`` of step t − 1 when ``resampled_at[i] == t − 1``, else slot k
(:meth:`twistlm.trace.GroupTrace.parents`); :func:`prefix_ids` follows that back exactly as the page script does.
Non-finite numbers other than those nulls are written "inf" / "-inf" / "nan".
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from twistlm.errors import ConfigError
from twistlm.files import atomic_write_text
from twistlm.html.template import render_page
from twistlm.trace import INACTIVE, GroupTrace, SMCTrace

if TYPE_CHECKING:
    from twistlm.result import SMCResult

DEFAULT_TITLE = "twistlm run"
LOG_DIGITS = 4
"""Decimals kept for per-step log weights and log ψ in the page (the page renormalises the weights itself)."""
ESS_DIGITS = 3


class _Vocab:
    """The page's token table: token id → (index, text), built as tokens are met."""

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self.ids: list[int] = []
        self.texts: list[str] = []

    def __call__(self, token_id: int, trace: GroupTrace) -> int:
        if token_id not in self.index:
            self.index[token_id] = len(self.ids)
            self.ids.append(token_id)
            self.texts.append(trace.token_text(token_id))
        return self.index[token_id]


def _log(x: float, digits: int = LOG_DIGITS) -> float | None:
    """A log value for the page: rounded, None for −∞ (weight zero) and NaN."""
    if math.isnan(x) or x == -math.inf:
        return None
    return x if math.isinf(x) else round(x, digits)


def _trace_entry(trace: GroupTrace, result: SMCResult, vocab: _Vocab) -> tuple[dict, list[list[int]]]:
    K, n = result.num_particles, len(result.ess)
    if trace.num_particles != K or trace.num_steps != n:
        raise ConfigError(
            f"the trace ({trace.num_particles} particles, {trace.num_steps} steps) is not of this result "
            f"({K} particles, {n} steps): pass the SMCTrace that was the run's callback"
        )
    tok = [[INACTIVE if v == INACTIVE else vocab(v, trace) for v in row] for row in trace.tokens.tolist()]
    logw = [[_log(x) for x in row] for row in trace.log_weights.tolist()]
    forced = [[k for k, f in enumerate(row) if f] for row in trace.forced.tolist()]
    psi = None if trace.log_psi is None else [[_log(x) for x in row] for row in trace.log_psi.tolist()]
    ids = [[vocab(v, trace) for v in seq] for seq in result.token_ids]
    return {"tok": tok, "logw": logw, "forced": forced, "psi": psi}, ids


def _run_entry(result: SMCResult, trace: GroupTrace | None, vocab: _Vocab) -> dict:
    entry: dict[str, Any] = {
        "prompt": result.prompt,
        "K": result.num_particles,
        "n": len(result.ess),
        "log_z": result.log_z,
        "texts": list(result.texts),
        "log_w": [_log(x) for x in result.log_weights.tolist()],
        "w": result.normalized_weights.tolist(),
        "log_phi": [float(x) for x in result.log_phi.tolist()],
        "eos": [bool(e) for e in result.finished_by_eos],
        "lineage": result.lineage(),
        "ess": [round(float(v), ESS_DIGITS) for v in result.ess],
        "resampled_at": [int(t) for t in result.resampled_at],
        "ancestors": [[int(a) for a in anc] for anc in result.ancestors],
        "ids": None,
        "trace": None,
    }
    if entry["n"] < 1:
        raise ConfigError("the result has no steps to show (empty ESS trace)")
    if trace is not None:
        entry["trace"], entry["ids"] = _trace_entry(trace, result, vocab)
    return entry


def _group_traces(trace: Any, count: int) -> list[GroupTrace | None]:
    """One GroupTrace (or None) per result from None, an SMCTrace, a GroupTrace or a list of them."""
    if trace is None:
        return [None] * count
    if isinstance(trace, SMCTrace):
        if trace.num_groups != count:
            raise ConfigError(f"the trace holds {trace.num_groups} prompt(s) but {count} result(s) were given")
        return [trace.group(b) for b in range(count)]
    traces = [trace] if isinstance(trace, GroupTrace) else list(trace)
    if len(traces) != count or not all(t is None or isinstance(t, GroupTrace) for t in traces):
        raise ConfigError(f"give one trace (SMCTrace.group(b)) per result: {count} result(s)")
    return traces


def page_data(
    results: Sequence[SMCResult],
    trace: SMCTrace | GroupTrace | Sequence[GroupTrace | None] | None = None,
    settings: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
) -> dict:
    """The data a run page embeds (module docstring) for ``results`` (one per prompt) and their trace."""
    results = list(results)
    if not results:
        raise ConfigError("no results to show")
    vocab = _Vocab()
    runs = [_run_entry(r, t, vocab) for r, t in zip(results, _group_traces(trace, len(results)))]
    shown = {"particles": results[0].num_particles, "steps": max(r["n"] for r in runs), **dict(settings or {})}
    return {"kind": "run", "title": title, "settings": shown, "vocab": vocab.texts, "vocab_ids": vocab.ids, "runs": runs}


def render_run_page(results: Sequence[SMCResult], trace: Any = None, settings: Mapping[str, Any] | None = None,
                    title: str = DEFAULT_TITLE) -> str:
    """The run page's HTML (see :func:`page_data` for the arguments)."""
    return render_page("run", title, page_data(results, trace, settings, title))


def write_run_page(path: str | os.PathLike, results: Sequence[SMCResult], trace: Any = None,
                   settings: Mapping[str, Any] | None = None, title: str = DEFAULT_TITLE) -> Path:
    """Write the run page to ``path`` atomically; returns the path."""
    return atomic_write_text(path, render_run_page(results, trace, settings, title))


def prefix_ids(run: Mapping[str, Any], t: int) -> list[list[int]]:
    """Token ids s_1:t of every slot at step t of one embedded run (``data["runs"][b]``, with a trace), following
    the ancestry back as the page script does; at t = n these are the final particles' ``ids`` (vocab indices)."""
    by_step = {s: anc for s, anc in zip(run["resampled_at"], run["ancestors"])}
    K, tok = run["K"], run["trace"]["tok"]
    identity = list(range(K))
    out = []
    for k in range(K):
        ids, slot = [], k
        for step in range(t, 0, -1):
            if tok[step - 1][slot] != INACTIVE:
                ids.append(tok[step - 1][slot])
            slot = by_step.get(step - 1, identity)[slot]
        out.append(ids[::-1])
    return out
