"""A few samples for the evaluation page: exact σ samples next to independent draws from every proposal.

Each proposal's draws are one importance-sampling run (κ = 0, so the K particles are i.i.d. draws from q) with a
seed of its own (:func:`twistlm.bounds.derive_seed`), so showing them never changes the bounds; their self-normalised
weights ŵ show how σ reweights q's draws. For a target with several prompts (BDMC: one per observed ending) the
draws use prompt 0, and the exact samples are one per run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from twistlm.bounds import as_proposal, derive_seed, select_prompts
from twistlm.smc import run_smc
from twistlm.target import Target

NUM_EXAMPLES = 6
"""Samples shown per column (exact σ, and each proposal)."""


def proposal_draws(target: Target, spec: Any, count: int, seed: object) -> list[dict]:
    """``count`` i.i.d. draws from one proposal on prompt 0 of ``target``: text, ŵ, log w, log φ; heaviest first."""
    first = select_prompts(target, [0]) if target.num_prompts > 1 else target
    result = run_smc(first, count, ess_threshold=0.0, seed=derive_seed(seed), **as_proposal(spec).sampler_kwargs())[0]
    rows = [
        {"text": text, "weight": float(w), "log_weight": float(lw), "log_phi": float(lp)}
        for text, w, lw, lp in zip(
            result.texts, result.normalized_weights.tolist(), result.log_weights.tolist(), result.log_phi.tolist()
        )
    ]
    return sorted(rows, key=lambda r: -r["weight"])


def report_examples(
    target: Target,
    proposals: Mapping[str, Any],
    exact_ids: Sequence[Sequence[int]] | None,
    exact_method: str,
    *,
    count: int = NUM_EXAMPLES,
    seed: int = 0,
) -> dict:
    """``{"exact": [text], "exact_method": str, "proposals": {name: [draw, ...]}}`` (see :func:`proposal_draws`)."""
    exact = [target.lm.decode(target.completion_ids(ids)) for ids in list(exact_ids or [])[:count]]
    draws = {name: proposal_draws(target, spec, count, (seed, "examples", name)) for name, spec in proposals.items()}
    return {"exact": exact, "exact_method": exact_method, "proposals": draws}
