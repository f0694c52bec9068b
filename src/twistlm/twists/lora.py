"""LoRA twist: a separate copy of the base model with LoRA adapters and its own linear head.

log ψ_t(s_<t, ·) = W g_t + b, where g_t is the last hidden state of the *adapted* copy after s_<t (not the frozen
base model's h_t, which ``TwistContext.hidden`` carries). The copy therefore has to run on the same tokens as the
sampler, with its own KV cache.

Incremental state. The twist keeps one KV-cached state per particle row, tagged with the row's key
(prompt index, s_<t). At step t it reads ``ctx.tokens`` and ``ctx.prompt_index`` and

* t = 1: encodes the prompts (``prefill``) and expands them to the rows' prompt indices;
* t > 1: finds, for every row, the cached row holding its parent prefix s_<t−1 (after resampling, rows hold copies
  of ancestors: any cached row with the same key has the same state), gathers the cache by that ancestor index
  (``reorder``) and appends s_t−1 (``step``);
* anything else (a call out of sequence) rebuilds the state from the prompts.

So it works inside the unchanged SMC loop — resampling, conditional SMC, enumeration — with O(1) new positions per
step. It only needs the prompts' token ids, which ``TwistContext`` does not carry: call :meth:`LoRATwist.start`
(``twist.start(target, K)``) or :meth:`bind_target` before sampling. The proposed sampler hooks (``start(target,
K)`` after prefill, ``reorder(index)`` after resampling, no-ops on the base :class:`Twist`) make this automatic.

Training (:meth:`log_psi_prefixes`) runs the adapted copy over whole sequences in one forward pass with grad.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from twistlm.errors import ConfigError, TwistLMError
from twistlm.lm import HFLM, LMState, ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.features import hf_prefix_hidden
from twistlm.twists.head import VocabHead
from twistlm.twists.io import check_compatible, load_twist_state, max_index, read_config, read_weights
from twistlm.twists.mlp import apply_output, check_output, seeded_init

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.target import Target
    from twistlm.twists.features import PrefixFeatures


class _HiddenOnlyLM(HFLM):
    """HFLM's KV-cached prefill/step/reorder over a model, returning hidden states only (no (N, V) logits)."""

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        hidden = self._hidden_states(input_ids, attention_mask, position_ids, cache)[:, -1]
        return hidden, hidden.new_zeros(hidden.shape[0], 0), cache


class LoRATwist(Twist):
    """ψ from a LoRA-adapted copy of the base model plus a linear head (see the module docstring)."""

    kind = "lora"

    def __init__(
        self,
        model: Any,
        eos_token_id: int,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        output: str = "log",
        base_model: str = "",
        level: bool = True,
    ):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        adapted = copy.deepcopy(model)
        for p in adapted.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none")
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (is_gradient_checkpointing)
            warnings.simplefilter("ignore", FutureWarning)
            self.peft = get_peft_model(adapted, lora)
        inner = self.peft.get_base_model()
        head = inner.get_output_embeddings()
        hidden_size, vocab_size = int(head.weight.shape[1]), int(head.weight.shape[0])
        self.hidden_size, self.vocab_size = hidden_size, vocab_size
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules
        self.output = check_output(output)
        self.base_model = base_model
        self.eos_token_id = int(eos_token_id)
        self.head = VocabHead(hidden_size, vocab_size, level=level).to(head.weight.device)
        self._runner = _HiddenOnlyLM(inner, SimpleNamespace(eos_token_id=self.eos_token_id), name="lora-twist")
        inner.train(self.training)
        self._prompt_ids: list[list[int]] | None = None
        self._state: LMState | None = None
        self._keys: list[tuple[int, tuple[int, ...]]] = []
        self.num_rebuilds = 0  # full re-encodings of the prompts (one per sampler run when all goes to plan)

    @classmethod
    def for_lm(
        cls,
        lm: ParticleLM,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        output: str = "log",
        init_scale: float = 0.0,
        seed: int = 0,
        level: bool = True,
    ) -> LoRATwist:
        """A LoRA twist over ``lm`` (a Hugging Face model); head zero (ψ ≡ 1) or N(0, init_scale²)."""
        if not isinstance(lm, HFLM):
            raise ConfigError("the LoRA twist needs a Hugging Face base model (it adapts a copy of it)")
        twist = seeded_init(
            lambda: cls(lm.model, lm.eos_token_id, r, alpha, dropout, target_modules, output, lm.name, level), seed
        )
        twist.head.reset(init_scale, torch.Generator().manual_seed(seed + 1))
        return twist

    # -- incremental state (sampling) -------------------------------------------------------------------------------

    def start(self, target: Target | Sequence[Sequence[int]], num_particles: int | None = None) -> None:
        """Sampler hook: a run is about to start on ``target``'s prompts (or these prompt ids); drops cached state."""
        prompt_ids = getattr(target, "prompt_ids", target)
        self._prompt_ids = [list(p) for p in prompt_ids]
        self._state, self._keys = None, []

    def bind_target(self, target: Target) -> LoRATwist:
        """Use ``target``'s prompts for the following sampler runs (what the ``start`` hook does automatically)."""
        self.start(target)
        return self

    def reorder(self, index: torch.Tensor) -> None:
        """Hook: the sampler resampled; row i is now old row ``index[i]`` (optional — rows are also matched by key)."""
        if self._state is not None:
            self._state = self._runner.reorder(self._state, index)
            self._keys = [self._keys[i] for i in index.tolist()]

    def train(self, mode: bool = True):
        self._state, self._keys = None, []  # parameters may change: cached states go stale
        return super().train(mode)

    def _rebuild(self, prompt_index: torch.Tensor, tokens: torch.Tensor) -> LMState:
        if self._prompt_ids is None:
            raise TwistLMError(
                "the LoRA twist needs the prompts' token ids: call twist.bind_target(target) (or twist.start(target)) "
                "before sampling"
            )
        if max_index(prompt_index) >= len(self._prompt_ids):
            raise TwistLMError(
                f"prompt index {int(prompt_index.max())} but the twist knows {len(self._prompt_ids)} "
                "prompts (call twist.bind_target(target))"
            )
        self.num_rebuilds += 1
        state = self._runner.prefill(self._prompt_ids, 1)
        state = self._runner.reorder(state, prompt_index)
        for j in range(tokens.shape[1]):
            state = self._runner.step(state, tokens[:, j])
        return state

    def _sync(self, ctx: TwistContext) -> torch.Tensor:
        """The adapted model's hidden state after s_<t for every row of ``ctx`` (advancing the cache)."""
        tokens, pidx = ctx.tokens.cpu(), ctx.prompt_index.cpu().long()
        keys = list(zip(pidx.tolist(), map(tuple, tokens.tolist())))
        depth = len(self._keys[0][1]) if self._keys else -1
        state = None
        if ctx.step > 1 and self._state is not None and depth in (ctx.step - 1, ctx.step - 2):
            row_of = {k: i for i, k in enumerate(self._keys)}
            wanted = keys if depth == ctx.step - 1 else [(b, s[:-1]) for b, s in keys]
            index = [row_of.get(k) for k in wanted]
            if all(i is not None for i in index):
                state = self._runner.reorder(self._state, torch.tensor(index, dtype=torch.long))
                if depth == ctx.step - 2:
                    state = self._runner.step(state, tokens[:, -1])
        if state is None:
            state = self._rebuild(pidx, tokens)
        self._state, self._keys = state, keys
        return state.hidden

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.head.weight
        return apply_output(self.head(hidden.to(device=w.device, dtype=w.dtype)), self.output)

    def log_psi(self, ctx: TwistContext) -> torch.Tensor:
        return self._head(self._sync(ctx)).to(ctx.hidden.device)

    # -- training -----------------------------------------------------------------------------------------------------

    def log_psi_prefixes(self, feats: PrefixFeatures) -> torch.Tensor:
        """(N, T, V) log ψ over all prefixes: one forward of the adapted copy over [prompt; s_1..s_T−1], with grad."""
        inner = self.peft.get_base_model()
        rows = [feats.prompt_ids[b] for b in feats.prompt_index.tolist()]
        hidden = hf_prefix_hidden(inner.base_model, rows, feats.tokens, self.eos_token_id, self.head.weight.device)
        return self._head(hidden)

    # -- persistence --------------------------------------------------------------------------------------------------

    def twist_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters and head only (the frozen copy of the base model is rebuilt from the base model on load)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def config(self) -> dict:
        return {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
            "output": self.output,
            "level": self.head.has_level,
            "base_model": self.base_model,
        }

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> LoRATwist:
        cfg = read_config(directory, cls.kind)
        if not isinstance(lm, HFLM):
            raise ConfigError("loading a LoRA twist needs its Hugging Face base model: load_twist(directory, lm)")
        check_compatible(cfg, lm, directory)
        twist = cls(
            lm.model,
            lm.eos_token_id,
            cfg["r"],
            cfg["alpha"],
            cfg["dropout"],
            cfg["target_modules"],
            cfg["output"],
            cfg.get("base_model", ""),
            cfg.get("level", False),
        )
        load_twist_state(twist, read_weights(directory))
        return twist
