"""The Potential contract.

A potential φ(s) ≥ 0 reweights the base model: σ(s) ∝ p0(s | x) φ(s) (MATH.md, "Target"). Implementations return
**log φ** for a batch of *finished* sequences:

* range: log φ ∈ [−∞, +∞); −∞ is a hard constraint (σ gives the sequence zero mass); +∞ and NaN are errors;
* ``bounded = True`` declares 0 ≤ φ ≤ 1 (log φ ≤ 0), which makes rejection sampling exact (MATH.md, "Exact target
  samples"); calling the potential checks the declaration;
* batching: one call gets every sequence that finished at a sampler step, as a :class:`Sequences`; it returns one
  value per sequence, in order (a tensor or a list of floats).

Call a potential through ``potential(seqs)``: that validates shape and values and raises :class:`PotentialError`
naming the potential, so a NaN never propagates silently into the weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from twistlm.errors import PotentialError, TwistLMError

BOUND_TOLERANCE = 1e-6
"""Slack for ``bounded`` potentials: log φ up to this value is float noise around φ = 1, not a broken promise."""


@dataclass
class Sequences:
    """A batch of finished sequences handed to a potential.

    prompts: the prompt of each sequence, as text (chat prompts rendered through the template).
    texts: the generated completion s of each sequence, decoded (EOS dropped).
    token_ids: the generated token ids (EOS dropped).
    prompt_index: which of the sampler's prompts each sequence belongs to.
    extras: per-prompt data for potentials that need it (e.g. gold answers, observed endings), keyed by name, each a
        list aligned with the sequences.
    prompt_ids: the prompt's token ids for each sequence, exactly as the sampler fed them to the LM (chat template
        included); empty when the caller built the batch by hand.
    raw_prompts: the prompt of each sequence as the target was given it (text, or chat messages before the
        template); empty when the caller built the batch by hand.

    Filled in by samplers (None / empty for a hand-built batch), so LM-based potentials need not recompute:
    log_p0: (n,) log p0(s | x) of each completion as sampled (its finishing EOS included; tool tokens excluded).
    lm_state / state_rows: the sampler's LM state and the row of each sequence in it; that row holds the KV cache of
        x + s except the tokens in ``unfed`` (the finishing token, unless it was a dropped EOS). Read-only: use
        ``lm.fork(lm_state, state_rows)`` for a copy to extend.
    """

    prompts: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    prompt_index: list[int] = field(default_factory=list)
    extras: dict[str, list[Any]] = field(default_factory=dict)
    prompt_ids: list[list[int]] = field(default_factory=list)
    raw_prompts: list[Any] = field(default_factory=list)
    log_p0: torch.Tensor | None = None
    lm_state: Any = None
    state_rows: torch.Tensor | None = None
    unfed: list[list[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)


class Potential(ABC):
    """log φ over finished sequences (see the module docstring for the contract)."""

    name: str = "potential"
    bounded: bool = False

    @abstractmethod
    def log_phi(self, seqs: Sequences) -> torch.Tensor | Sequence[float]:
        """log φ(s) for each sequence of the batch (shape (len(seqs),))."""

    def __call__(self, seqs: Sequences) -> torch.Tensor:
        if len(seqs) == 0:
            return torch.zeros(0, dtype=torch.float64)
        try:
            raw = self.log_phi(seqs)
        except TwistLMError:  # already a clear, user-facing error (PotentialError, ConfigError, DataError, ...)
            raise
        except Exception as exc:  # the potential's own bug or failure: name it, keep the cause
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise PotentialError(
                f"potential {self.name!r} raised {type(exc).__name__}" + (f": {detail}" if detail else "")
            ) from exc
        try:
            values = torch.as_tensor(raw, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PotentialError(f"potential {self.name!r} returned something that is not numbers: {exc}") from exc
        if values.numel() != len(seqs):
            raise PotentialError(f"potential {self.name!r} returned {values.numel()} values for {len(seqs)} sequences")
        bad = torch.isnan(values)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise PotentialError(f"potential {self.name!r} returned NaN for completion {seqs.texts[i]!r}")
        if torch.isposinf(values).any():
            raise PotentialError(f"potential {self.name!r} returned +inf (log φ must be finite or −inf)")
        if self.bounded and (values > BOUND_TOLERANCE).any():
            worst = float(values.max())
            raise PotentialError(f"potential {self.name!r} declares 0 ≤ φ ≤ 1 but returned log φ = {worst:.4g} > 0")
        return values.clamp(max=0.0) if self.bounded else values

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, bounded={self.bounded})"

    # Sugar for the combinators: ``p1 + p2`` is Sum (φ1·φ2), ``p * beta`` is Scaled (φ^β).
    def __add__(self, other):
        from twistlm.potentials.combinators import Sum

        return Sum(self, other) if isinstance(other, Potential) or callable(other) else NotImplemented

    def __mul__(self, beta):
        from twistlm.potentials.combinators import Scaled

        return Scaled(self, beta) if isinstance(beta, (int, float)) and not isinstance(beta, bool) else NotImplemented

    __rmul__ = __mul__


class FunctionPotential(Potential):
    """Wrap a plain callable ``fn(texts: list[str]) -> list[float]`` returning log φ for each completion."""

    def __init__(self, fn: Callable[[list[str]], Sequence[float]], name: str | None = None, bounded: bool = False):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "function")
        self.bounded = bounded

    def log_phi(self, seqs: Sequences) -> Sequence[float]:
        return self.fn(list(seqs.texts))


class ZeroPotential(Potential):
    """φ ≡ 1 (log φ = 0): σ is the base model itself. Useful for benchmarks and as a neutral element."""

    name = "none"
    bounded = True

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        return torch.zeros(len(seqs), dtype=torch.float64)


def as_potential(obj: Potential | Callable[[list[str]], Sequence[float]] | None) -> Potential:
    """Accept a Potential, a plain callable on texts returning log φ, or None (φ ≡ 1)."""
    if obj is None:
        return ZeroPotential()
    if isinstance(obj, Potential):
        return obj
    if callable(obj):
        return FunctionPotential(obj)
    raise PotentialError(f"expected a Potential or a callable texts -> log φ, got {type(obj).__name__}")
