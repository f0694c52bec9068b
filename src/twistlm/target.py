"""The target σ(s) ∝ p0(s | x) φ(s) over completions s of at most T tokens (MATH.md, "Target")."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twistlm.errors import ConfigError, PromptTooLongError
from twistlm.lm import ParticleLM, Prompt
from twistlm.potentials.base import Potential, Sequences, as_potential


@dataclass
class Target:
    """Base LM + prompt(s) + potential + horizon.

    lm: the base model p0.
    prompt / prompts: one prompt, or several (sampled side by side as B groups of K particles). Text or chat messages.
    potential: φ, a :class:`Potential` or a callable ``texts -> log φ`` (None means φ ≡ 1).
    max_new_tokens: T. A particle that has not stopped by then finishes at T.
    stop_at_eos: EOS finishes a particle (it is not part of the text). If False, EOS is an ordinary token.
    stop_token_ids: further tokens that finish a particle; unlike EOS they stay in the completion (e.g. ".").
    extras: per-prompt data handed to the potential (see :class:`~twistlm.potentials.Sequences`).
    tool: a :class:`~twistlm.tools.Tool` whose output is spliced into completions as they are sampled (the target is
        then p0 with tool outputs forced).
    """

    lm: ParticleLM
    prompt: Prompt | None = None
    potential: Potential | Callable[[list[str]], Sequence[float]] | None = None
    max_new_tokens: int = 32
    prompts: list[Prompt] | None = None
    stop_at_eos: bool = True
    stop_token_ids: Sequence[int] = ()
    extras: dict[str, list[Any]] = field(default_factory=dict)
    tool: Any = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompts is None):
            raise ConfigError("give exactly one of prompt= (one prompt) or prompts= (a list)")
        if self.prompts is None:
            self.prompts = [self.prompt]
        if len(self.prompts) == 0:
            raise ConfigError("prompts is empty")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.potential = as_potential(self.potential)
        self.prompt_ids = [self.lm.encode(p) for p in self.prompts]
        self.prompt_texts = [self.lm.prompt_text(p) for p in self.prompts]
        limit = self.lm.max_length
        for ids in self.prompt_ids:
            if limit is not None and len(ids) + self.max_new_tokens > limit:
                raise PromptTooLongError(
                    f"prompt of {len(ids)} tokens + max_new_tokens {self.max_new_tokens} exceeds the model's "
                    f"context of {limit} tokens"
                )
        for name, values in self.extras.items():
            if len(values) != len(self.prompts):
                raise ConfigError(f"extras[{name!r}] has {len(values)} entries for {len(self.prompts)} prompts")
        stops = {int(t) for t in self.stop_token_ids}
        if self.stop_at_eos:
            stops.add(self.lm.eos_token_id)
        self.stop_ids = sorted(stops)

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    def select(self, indices: Sequence[int]) -> Target:
        """The same target over prompts ``indices`` (in that order, repeats allowed), extras sliced alike."""
        sub = copy.copy(self)
        sub.prompts = [self.prompts[i] for i in indices]
        sub.prompt_ids = [self.prompt_ids[i] for i in indices]
        sub.prompt_texts = [self.prompt_texts[i] for i in indices]
        sub.extras = {k: [v[i] for i in indices] for k, v in self.extras.items()}
        sub.prompt = None
        return sub

    def completion_ids(self, generated: Sequence[int]) -> list[int]:
        """The completion's tokens as potentials see them: a final EOS (when it stops the particle) dropped."""
        ids = list(generated)
        if self.stop_at_eos and ids and ids[-1] == self.lm.eos_token_id:
            ids = ids[:-1]
        return ids

    def sequences(self, generated: Sequence[Sequence[int]], prompt_index: Sequence[int], **context: Any) -> Sequences:
        """Package finished generations for the potential (``context``: the sampler's fields of Sequences)."""
        ids = [self.completion_ids(g) for g in generated]
        return Sequences(
            **context,
            unfed=[c[len(g) - 1 :] for c, g in zip(ids, generated)] if "lm_state" in context else [],
            prompts=[self.prompt_texts[b] for b in prompt_index],
            texts=[self.lm.decode(i) for i in ids],
            token_ids=ids,
            prompt_index=list(prompt_index),
            extras={k: [v[b] for b in prompt_index] for k, v in self.extras.items()},
            prompt_ids=[self.prompt_ids[b] for b in prompt_index],
            raw_prompts=[self.prompts[b] for b in prompt_index],
        )

    def log_phi(self, generated: Sequence[Sequence[int]], prompt_index: Sequence[int], **context: Any):
        """log φ of finished generations (validated: NaN raises an error naming the potential)."""
        return self.potential(self.sequences(generated, prompt_index, **context))
