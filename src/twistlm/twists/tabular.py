"""Tabular twist: one free parameter log ψ_t(s_<t, v) per (unfinished prefix s_<t, token v).

For the toy LM (vocabularies of a handful of tokens, T ≤ 4) the table is small, and — unlike a head over hidden
states — it can represent the optimal twist ψ* exactly (MATH.md, "Twists and proposals"). That is what the
exactness tests of the twist losses need: a loss whose optimum is ψ* must drive this twist's proposal to σ.

Rows are the prefixes of length 0..T−1 that contain no stop token; a row holds V values, one per next token
(including stop tokens, whose value shapes the proposal for finishing: at the optimum it is φ of the finished
sequence). Particles whose prefix is not in the table (finished rows, padded with EOS) get log ψ = 0: the sampler
ignores them. With ``per_prompt=True`` each prompt (``TwistContext.prompt_index``) has its own table.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.io import check_compatible, load_twist_state, max_index, read_config, read_weights
from twistlm.twists.mlp import apply_output, check_output

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.exact import OptimalTwist
    from twistlm.target import Target
    from twistlm.twists.features import PrefixFeatures

MAX_TABLE_ENTRIES = 5_000_000
"""Refuse tables with more (prefix, token) entries than this: tabular twists are for toy problems."""


def _table_entries(live: int, horizon: int, per_row: int) -> int:
    """Entries of a table over prefixes of length 0..horizon−1 (counting stops once past the limit: T may be huge)."""
    rows, level = 0, 1
    for _ in range(horizon):
        rows += level
        level *= live
        if rows * per_row > MAX_TABLE_ENTRIES or level == 0:
            break
    return rows * per_row


class TabularTwist(Twist):
    """A table of log ψ values indexed by (prompt, prefix, next token)."""

    kind = "tabular"

    def __init__(
        self,
        vocab_size: int,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        num_prompts: int = 1,
        per_prompt: bool = False,
        output: str = "log",
        base_model: str = "",
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        self.vocab_size, self.max_new_tokens = int(vocab_size), int(max_new_tokens)
        self.stop_ids = sorted(int(s) for s in stop_ids)
        self.per_prompt, self.num_prompts = bool(per_prompt), int(num_prompts) if per_prompt else 1
        self.output = check_output(output)
        self.base_model = base_model
        live = [v for v in range(self.vocab_size) if v not in set(self.stop_ids)]
        if _table_entries(len(live), self.max_new_tokens, self.vocab_size * self.num_prompts) > MAX_TABLE_ENTRIES:
            raise ConfigError(
                f"a tabular twist for vocabulary {vocab_size} and T = {max_new_tokens} needs more than "
                f"{MAX_TABLE_ENTRIES:,} entries; use a head over hidden states (mlp, linear)"
            )
        prefixes = [p for n in range(self.max_new_tokens) for p in itertools.product(live, repeat=n)]
        self.index = {p: i for i, p in enumerate(prefixes)}
        self.table = nn.Parameter(torch.zeros(self.num_prompts, len(prefixes), self.vocab_size, dtype=dtype))
        self.unknown = len(prefixes)

    @classmethod
    def for_target(
        cls,
        target: Target,
        per_prompt: bool = False,
        output: str = "log",
        init_scale: float = 0.0,
        seed: int = 0,
    ) -> TabularTwist:
        """A table for ``target``'s vocabulary, horizon T and stop tokens: zeros (ψ ≡ 1) or N(0, init_scale²)."""
        lm = target.lm
        twist = cls(
            lm.vocab_size, target.max_new_tokens, target.stop_ids, target.num_prompts, per_prompt, output, lm.name
        )
        if init_scale:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                twist.table.copy_(init_scale * torch.randn(twist.table.shape, generator=g, dtype=twist.table.dtype))
        return twist

    @classmethod
    def from_optimal(cls, optimal: OptimalTwist, target: Target) -> TabularTwist:
        """The table holding ψ* of an :class:`~twistlm.exact.OptimalTwist` (log ψ* = −∞ where φ rules a token out)."""
        twist = cls.for_target(target)
        with torch.no_grad():
            for prefix, row in twist.index.items():
                for v in range(twist.vocab_size):
                    value = optimal.table.get(prefix + (v,))
                    twist.table[0, row, v] = -math.inf if value is None else value
        return twist

    def _rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Table row of each prefix (``self.unknown`` for prefixes outside the table)."""
        get = self.index.get
        return torch.tensor([get(tuple(r), self.unknown) for r in tokens.tolist()], dtype=torch.long)

    def _lookup(self, rows: torch.Tensor, prompt_index: torch.Tensor) -> torch.Tensor:
        table = torch.cat([self.table, self.table.new_zeros(self.num_prompts, 1, self.vocab_size)], dim=1)
        prompts = prompt_index.long().cpu() if self.per_prompt else torch.zeros_like(rows)
        if self.per_prompt and max_index(prompts) >= self.num_prompts:
            raise ConfigError(
                f"tabular twist has tables for {self.num_prompts} prompts, got prompt index {int(prompts.max())}"
            )
        out = table[prompts.to(table.device), rows.to(table.device)]
        known = (rows != self.unknown).to(out.device).unsqueeze(-1)
        # Rows outside the table (finished particles) read 0: log ψ = 0 whatever the output transform.
        return torch.where(known, apply_output(out, self.output), torch.zeros_like(out))

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self._lookup(self._rows(ctx.tokens), ctx.prompt_index).to(ctx.hidden.device)

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        N, T = feats.tokens.shape
        rows = torch.stack([self._rows(feats.tokens[:, :t]) for t in range(T)], dim=1)  # prefix s_<t+1
        prompt = feats.prompt_index.cpu().unsqueeze(1).expand(N, T)
        return self._lookup(rows.reshape(-1), prompt.reshape(-1)).view(N, T, self.vocab_size)

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "max_new_tokens": self.max_new_tokens,
            "stop_ids": self.stop_ids,
            "num_prompts": self.num_prompts,
            "per_prompt": self.per_prompt,
            "output": self.output,
            "dtype": str(self.table.dtype).removeprefix("torch."),
            "base_model": self.base_model,
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> TabularTwist:
        cfg = read_config(directory, cls.kind)
        check_compatible(cfg, lm, directory)
        twist = cls(
            cfg["vocab_size"],
            cfg["max_new_tokens"],
            cfg["stop_ids"],
            cfg["num_prompts"],
            cfg["per_prompt"],
            cfg["output"],
            cfg.get("base_model", ""),
            getattr(torch, cfg.get("dtype", "float64")),
        )
        load_twist_state(twist, read_weights(directory))
        return twist.to(lm.device) if lm is not None else twist
