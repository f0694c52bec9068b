"""Conditional twists: one head amortised over conditions, ψ_t(s_1:t | c) (MATH.md, "Twists and proposals").

The condition c of each prompt is either

* a class label (e.g. the target sentiment / star rating): ``condition="label"``, an integer in [0, num_labels);
* an observed token sequence (infilling: the ending o that σ(s | o) ∝ p0(s) p0(o | s) conditions on):
  ``condition="tokens"``, the first ``max_condition_tokens`` tokens of o.

log ψ_t(s_<t, ·) = MLP([h_t; e(c)]) with h_t the base LM's hidden state and e(c) a learned embedding: a label
embedding, or for tokens the concatenation of per-position token embeddings (order-aware) projected to ``embed_dim``.

Conditions are per prompt: :meth:`ConditionalTwist.set_conditions` takes one condition per prompt of the target (or
:meth:`bind_target` reads them from ``target.extras[condition_key]``), and the twist looks row n's condition up
through ``TwistContext.prompt_index``. Conditions are data, not parameters: they are not saved with the twist.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from twistlm.errors import ConfigError, TwistLMError
from twistlm.lm import HFLM, ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.head import VocabHead
from twistlm.twists.io import check_compatible, load_twist_state, max_index, read_config, read_weights
from twistlm.twists.mlp import apply_output, check_output, mlp_layers, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.target import Target
    from twistlm.twists.features import PrefixFeatures

CONDITIONS = ("label", "tokens")
CONDITION_KEYS = ("label", "rating", "observation")
"""``target.extras`` keys tried, in order, when no ``condition_key`` is given (the built-in tasks' names)."""


def encode_plain(lm: ParticleLM, text: str) -> list[int]:
    """Token ids of a text fragment with no special tokens (an observation, not a prompt)."""
    if isinstance(lm, HFLM):
        return list(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    return lm.encode(text)


class ConditionalTwist(Twist):
    """log ψ_t(s_<t, · | c) = MLP([h_t; e(c)]); c set per prompt (see the module docstring)."""

    kind = "conditional"

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        condition: str = "label",
        num_labels: int = 2,
        max_condition_tokens: int = 8,
        embed_dim: int = 32,
        width: int = 256,
        depth: int = 1,
        condition_key: str = "label",
        output: str = "log",
        base_model: str = "",
        level: bool = True,
    ):
        super().__init__()
        if condition not in CONDITIONS:
            raise ConfigError(f"unknown condition type {condition!r}; choose from: {', '.join(CONDITIONS)}")
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.condition, self.num_labels, self.max_condition_tokens = condition, num_labels, max_condition_tokens
        self.embed_dim, self.width, self.depth, self.condition_key = embed_dim, width, depth, condition_key
        self.output = check_output(output)
        self.base_model = base_model
        if condition == "label":
            self.embed = nn.Embedding(num_labels, embed_dim)
        else:
            # Token embeddings (index V = padding), one slot per position, concatenated then projected.
            self.embed = nn.Embedding(vocab_size + 1, embed_dim, padding_idx=vocab_size)
            self.project = nn.Linear(max_condition_tokens * embed_dim, embed_dim)
        self.net, size = mlp_layers(hidden_size + embed_dim, width, depth)
        self.out = VocabHead(size, vocab_size, level=level)
        self.register_buffer("conditions", torch.zeros(0, dtype=torch.long), persistent=False)

    @classmethod
    def for_lm(
        cls,
        lm: ParticleLM,
        init_scale: float = 0.0,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float32,
        **options: Any,
    ) -> ConditionalTwist:
        twist = seeded_init(lambda: cls(lm.hidden_size, lm.vocab_size, base_model=lm.name, **options), seed)
        twist.out.reset(init_scale, torch.Generator().manual_seed(seed + 1))
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return twist.to(device=lm.device, dtype=dtype)

    @classmethod
    def for_target(cls, target: Target, condition_key: str | None = None, **options: Any) -> ConditionalTwist:
        """A twist for ``target`` whose conditions come from ``target.extras[condition_key]``.

        The key defaults to the first of :data:`CONDITION_KEYS` the target has; integer values make a label
        twist (``num_labels`` = 1 + the largest label unless given), token lists or strings a token twist.
        """
        extras = target.extras
        if condition_key is None:
            found = [k for k in CONDITION_KEYS if k in extras]
            if not found:
                raise ConfigError(
                    f"the conditional twist needs per-prompt conditions in target.extras (one of {CONDITION_KEYS}); "
                    f"this target has: {', '.join(extras) or 'no extras'}"
                )
            condition_key = found[0]
        if condition_key not in extras:
            raise ConfigError(f"target has no extras[{condition_key!r}] to condition on")
        values = extras[condition_key]
        is_label = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        options.setdefault("condition", "label" if is_label else "tokens")
        if options["condition"] == "label":
            options.setdefault("num_labels", max(2, 1 + max(values)))
        twist = cls.for_lm(target.lm, condition_key=condition_key, **options)
        twist.bind_target(target)
        return twist

    # -- conditions ------------------------------------------------------------------------------------------------

    def set_conditions(self, conditions: Sequence[Any], lm: ParticleLM | None = None) -> ConditionalTwist:
        """One condition per prompt: labels (ints), or observations (token id lists, or strings with ``lm``)."""
        device = self.out.weight.device
        if self.condition == "label":
            labels = torch.as_tensor([int(c) for c in conditions], dtype=torch.long)
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_labels):
                raise ConfigError(f"labels must lie in [0, {self.num_labels}), got {labels.tolist()}")
            self.conditions = labels.to(device)
            return self
        L, pad = self.max_condition_tokens, self.vocab_size
        rows = []
        for c in conditions:
            if isinstance(c, str):
                if lm is None:
                    raise ConfigError("text observations need the base LM to tokenise them: set_conditions(..., lm=lm)")
                c = encode_plain(lm, c)
            ids = [int(i) for i in c][:L]
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"observation token ids must lie in [0, {self.vocab_size})")
            rows.append(ids + [pad] * (L - len(ids)))
        self.conditions = torch.tensor(rows, dtype=torch.long).view(len(rows), L).to(device)
        return self

    def bind_target(self, target: Target) -> ConditionalTwist:
        """Read the per-prompt conditions from ``target.extras[condition_key]``."""
        if self.condition_key not in target.extras:
            raise ConfigError(f"target has no extras[{self.condition_key!r}] for this conditional twist")
        return self.set_conditions(target.extras[self.condition_key], lm=target.lm)

    def start(self, target: Target, num_particles: int | None = None) -> None:
        """Sampler hook: take the conditions of ``target`` (when it has ``extras[condition_key]``; otherwise keep the
        conditions set before)."""
        if self.condition_key in getattr(target, "extras", {}):
            self.bind_target(target)

    def _condition_embedding(self, prompt_index: torch.Tensor) -> torch.Tensor:
        if self.conditions.shape[0] == 0:
            raise TwistLMError(
                "the conditional twist has no conditions: call twist.bind_target(target) or "
                "twist.set_conditions([...]) (one per prompt) before sampling or training"
            )
        index = prompt_index.to(self.conditions.device).long()
        if max_index(index) >= self.conditions.shape[0]:
            raise TwistLMError(f"prompt index {int(index.max())} but only {self.conditions.shape[0]} conditions set")
        cond = self.conditions[index]
        if self.condition == "label":
            return self.embed(cond)
        return self.project(self.embed(cond).flatten(1))

    def _features(self, hidden: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        weight = self.out.weight
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        c = self._condition_embedding(prompt_index).to(weight.dtype)
        if hidden.dim() == 3:
            c = c.unsqueeze(1).expand(-1, hidden.shape[1], -1)
        return self.net(torch.cat([hidden, c], dim=-1))

    def _head(self, hidden: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        return apply_output(self.out(self._features(hidden, prompt_index)), self.output)

    def log_psi_tokens(self, hidden: torch.Tensor, tokens: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        """log ψ_t(s_<t, s_t) at the stored tokens only: (N, T, H), (N, T), (N,) → (N, T), with grad."""
        feats = self._features(hidden, prompt_index)
        return apply_output(self.out.at(feats, tokens.to(feats.device)), self.output)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self._head(ctx.hidden, ctx.prompt_index).to(ctx.hidden.device)

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        return self._head(feats.hidden, feats.prompt_index)

    # -- persistence -----------------------------------------------------------------------------------------------

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "condition": self.condition,
            "num_labels": self.num_labels,
            "max_condition_tokens": self.max_condition_tokens,
            "embed_dim": self.embed_dim,
            "width": self.width,
            "depth": self.depth,
            "condition_key": self.condition_key,
            "output": self.output,
            "level": self.out.has_level,
            "dtype": str(self.out.weight.dtype).removeprefix("torch."),
            "base_model": self.base_model,
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> ConditionalTwist:
        cfg = read_config(directory, cls.kind)
        check_compatible(cfg, lm, directory)
        keys = (
            "condition",
            "num_labels",
            "max_condition_tokens",
            "embed_dim",
            "width",
            "depth",
            "condition_key",
            "output",
        )
        twist = cls(
            cfg["hidden_size"],
            cfg["vocab_size"],
            base_model=cfg.get("base_model", ""),
            level=cfg.get("level", False),
            **{k: cfg[k] for k in keys},
        )
        twist = twist.to(getattr(torch, cfg.get("dtype", "float32")))
        load_twist_state(twist, read_weights(directory))
        return twist.to(lm.device) if lm is not None else twist
