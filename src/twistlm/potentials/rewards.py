"""Reward potentials: φ(s) = exp(β · Σ_i w_i r_i(s)) for TRL-style reward functions.

A reward function has TRL's signature ``f(prompts, completions, **kwargs) -> list[float]``: ``prompts`` and
``completions`` are lists of strings (one per sequence), and every extra dataset column arrives as a keyword list
aligned with them. Here those columns are the target's per-prompt ``extras`` (``Sequences.extras``, already expanded
to one value per sequence): a target built with ``extras={"answer": golds}`` calls ``f(..., answer=[...])``. The
keyword ``completion_ids`` (the generated token ids, EOS dropped) is passed as well, as TRL does.

log φ = β · (Σ_i w_i r_i − m), with m = ``max_reward`` or 0:

* without ``max_reward`` the potential is **not bounded**: rewards are arbitrary reals, so φ may exceed 1. SMC and
  twisted SMC don't care (σ is unchanged by a constant factor); rejection sampling needs φ ≤ 1;
* with ``max_reward`` = m, a known upper bound on Σ_i w_i r_i, and β ≥ 0, log φ ≤ 0 and the potential is declared
  bounded (σ is the same; Z is scaled by e^{−β m}). A total above m is reported as an error by the bound check.

Conversational format (``conversational=True``), as ``GRPOTrainer`` calls reward functions on a conversational
dataset: each prompt is its list of chat messages (a text prompt becomes one user message) and each completion is
``[{"role": "assistant", "content": text}]`` — so functions written for TRL's conversational data, e.g. the GRPO
recipe's ``[c[0]["content"] for c in completions]`` and ``prompts[0][-1]["content"]``, run unchanged. The default
(False) passes both as plain strings (TRL's standard format).

A reward returning None or NaN for an item, the wrong number of values, or something that is not a number raises
:class:`~twistlm.errors.PotentialError` naming the reward function.

:func:`gsm8k_potential` builds the GSM8K recipe's five rewards (:mod:`twistlm.potentials.gsm8k_rewards`) summed
with ``GSM8K_REWARD_WEIGHTS``; gold answers come from ``extras["answer"]``. CLI spec: ``gsm8k[:recipe|corrected]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from twistlm.errors import ConfigError, PotentialError
from twistlm.potentials.base import Potential, Sequences
from twistlm.potentials.simple import register_potential

RewardFunc = Callable[..., Sequence[float]]

RESERVED_KWARGS = ("prompts", "completions", "completion_ids")


def _finite_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return float(value)


ASSISTANT, USER = "assistant", "user"


def _as_messages(prompt: Any) -> list[dict[str, Any]]:
    """A prompt as chat messages: messages stay as they are, text becomes one user message."""
    return [{"role": USER, "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]


class RewardPotential(Potential):
    """φ = exp(β · (Σ_i w_i r_i − max_reward)) for TRL-style reward functions (see the module docstring).

    reward_funcs: one function, a list of functions, or a dict name → function (names appear in errors).
    weights: one weight per function (a list, or a dict keyed like ``reward_funcs``); default all 1.
    beta: β, the inverse temperature. max_reward: optional upper bound on the weighted total (makes it bounded).
    conversational: call the functions with chat-message prompts and completions (module docstring).
    """

    def __init__(
        self,
        reward_funcs: RewardFunc | Sequence[RewardFunc] | Mapping[str, RewardFunc],
        weights: Sequence[float] | Mapping[str, float] | None = None,
        beta: float = 1.0,
        max_reward: float | None = None,
        name: str | None = None,
        conversational: bool = False,
    ):
        if isinstance(reward_funcs, Mapping):
            funcs = dict(reward_funcs)
        elif callable(reward_funcs):
            funcs = {getattr(reward_funcs, "__name__", "reward"): reward_funcs}
        else:
            funcs = {}
            for i, f in enumerate(reward_funcs):
                key = getattr(f, "__name__", f"reward_{i}")
                funcs[key if key not in funcs else f"{key}_{i}"] = f
        if not funcs:
            raise ConfigError("RewardPotential needs at least one reward function")
        for key, f in funcs.items():
            if not callable(f):
                raise ConfigError(f"reward {key!r} is not callable")
        if weights is None:
            w = {k: 1.0 for k in funcs}
        elif isinstance(weights, Mapping):
            unknown = set(weights) - set(funcs)
            if unknown:
                raise ConfigError(f"weights for unknown reward functions {sorted(unknown)}; have {list(funcs)}")
            w = {k: _finite_number(weights.get(k, 1.0), f"weight of {k!r}") for k in funcs}
        else:
            weights = list(weights)
            if len(weights) != len(funcs):
                raise ConfigError(f"{len(weights)} weights for {len(funcs)} reward functions")
            w = {k: _finite_number(x, f"weight of {k!r}") for k, x in zip(funcs, weights)}
        self.reward_funcs = funcs
        self.weights = w
        self.beta = _finite_number(beta, "beta")
        self.max_reward = None if max_reward is None else _finite_number(max_reward, "max_reward")
        self.bounded = self.max_reward is not None and self.beta >= 0
        self.conversational = bool(conversational)
        self.name = name or "reward:" + "+".join(funcs)

    def rewards(self, seqs: Sequences) -> dict[str, torch.Tensor]:
        """Each reward function's values r_i(s), validated, keyed by name."""
        clash = [k for k in seqs.extras if k in RESERVED_KWARGS]
        if clash:
            raise PotentialError(f"potential {self.name!r}: extras may not be named {clash} (TRL reserves them)")
        kwargs: dict[str, Any] = {k: list(v) for k, v in seqs.extras.items()}
        prompts, completions = list(seqs.prompts), list(seqs.texts)
        if self.conversational:
            prompts = [_as_messages(p) for p in (seqs.raw_prompts or seqs.prompts)]
            completions = [[{"role": ASSISTANT, "content": text}] for text in seqs.texts]
        out = {}
        for key, f in self.reward_funcs.items():
            try:
                raw = f(prompts, completions, completion_ids=[list(i) for i in seqs.token_ids], **kwargs)
            except Exception as exc:  # a user's function: report which one failed, and how
                raise PotentialError(
                    f"reward function {key!r} (in potential {self.name!r}) raised {type(exc).__name__}: {exc}"
                ) from exc
            out[key] = self._check(key, raw, len(seqs), list(seqs.texts))
        return out

    def _check(self, key: str, raw: object, n: int, completions: list[str]) -> torch.Tensor:
        where = f"reward function {key!r} (in potential {self.name!r})"
        if raw is None or isinstance(raw, (str, bytes)):
            raise PotentialError(f"{where} returned {raw!r}, not a list of numbers")
        try:
            values = list(raw)
        except TypeError as exc:
            raise PotentialError(f"{where} returned {type(raw).__name__}, not a list of numbers") from exc
        if len(values) != n:
            raise PotentialError(f"{where} returned {len(values)} values for {n} completions")
        nums = []
        for i, v in enumerate(values):
            if v is None:
                raise PotentialError(f"{where} returned None for completion {completions[i]!r:.80}")
            try:
                x = float(v)
            except (TypeError, ValueError) as exc:
                raise PotentialError(f"{where} returned {v!r} for completion {completions[i]!r:.80}") from exc
            if math.isnan(x):
                raise PotentialError(f"{where} returned NaN for completion {completions[i]!r:.80}")
            if math.isinf(x) and x > 0:
                raise PotentialError(f"{where} returned +inf for completion {completions[i]!r:.80}")
            nums.append(x)
        return torch.tensor(nums, dtype=torch.float64)

    def total(self, seqs: Sequences) -> torch.Tensor:
        """Σ_i w_i r_i(s) for each sequence."""
        total = torch.zeros(len(seqs), dtype=torch.float64)
        for key, r in self.rewards(seqs).items():
            w = self.weights[key]
            if w != 0.0:
                total = total + w * r
        if torch.isposinf(total).any():
            raise PotentialError(f"potential {self.name!r}: a negative weight turned a reward of −inf into +inf")
        return total

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        total = self.total(seqs)
        if self.max_reward is not None:
            total = total - self.max_reward
        if self.beta == 0.0:
            return torch.where(torch.isneginf(total), total, torch.zeros_like(total))
        return self.beta * total


GSM8K_MAX_REWARD = 4.0
"""Upper bound on the five GSM8K rewards' weighted sum: 2.0 + 0.5 + 0.5 + 0.5 + count_xml ≤ 0.5 (both variants)."""


def gsm8k_potential(variant: str = "corrected", beta: float = 1.0, bounded: bool = False) -> RewardPotential:
    """φ = exp(β · Σ GSM8K rewards) (the recipe's five rewards, weights ``GSM8K_REWARD_WEIGHTS``).

    Needs ``extras={"answer": [...]}`` on the target (gold answers, numbers or raw GSM8K answers with ``####``).
    ``bounded=True`` subtracts ``GSM8K_MAX_REWARD`` (φ ≤ 1 for β ≥ 0; σ unchanged).
    """
    from twistlm.potentials.gsm8k_rewards import GSM8K_REWARD_WEIGHTS, gsm8k_reward_functions

    funcs = gsm8k_reward_functions(variant)
    return RewardPotential(
        funcs,
        weights={k: GSM8K_REWARD_WEIGHTS[k] for k in funcs},
        beta=beta,
        max_reward=GSM8K_MAX_REWARD if bounded else None,
        name=f"gsm8k:{variant}",
    )


register_potential("gsm8k", lambda arg: gsm8k_potential(arg or "corrected"))
