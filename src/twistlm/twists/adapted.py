"""A LoRA-adapted copy of the base model that runs on the sampler's tokens: the shared machinery of the twists that
compute with their own adapted model (:mod:`twistlm.twists.lora`, :mod:`twistlm.twists.ratio`).

Incremental state. The twist keeps one KV-cached state per particle row, tagged with the row's key
(prompt index, s_<t). At step t it reads ``ctx.tokens`` and ``ctx.prompt_index`` and

* t = 1: encodes the prompts (``prefill``) and expands them to the rows' prompt indices;
* t > 1: finds, for every row, the cached row holding its parent prefix s_<t−1 (after resampling, rows hold copies
  of ancestors: any cached row with the same key has the same state), gathers the cache by that ancestor index
  (``reorder``) and appends s_t−1 (``step``);
* anything else (a call out of sequence) rebuilds the state from the prompts.

So it works inside the unchanged SMC loop — resampling, conditional SMC, enumeration — with O(1) new positions per
step. It only needs the prompts' token ids, which ``TwistContext`` does not carry: call ``twist.start(target, K)``
or :meth:`AdaptedCopyTwist.bind_target` before sampling. The sampler hooks (``start(target, K)`` after prefill,
``reorder(index)`` after resampling, no-ops on the base :class:`Twist`) make this automatic; the trainers bind the
target too.

What the copy reads (``condition``, :mod:`twistlm.conditioning`): the target's prompts x (``"prompt"``, the default),
or ``"observation"``: ``"Ending: " o "\n\n" x`` with the observation o of each prompt (``target.extras
["observation"]``, infilling's ending) — one twist amortized over observations, ψ_t(s_1:t | o). p0's side of every
twist value keeps the target's own prompts (:attr:`AdaptedCopyTwist.base_rows`), so the twist still multiplies p0(s |
x) and the SMC weights stay exact whatever the copy reads.

Training (:meth:`AdaptedCopyTwist.prefix_hidden`) runs the adapted copy over whole sequences in one forward pass with
grad. Only the adapters train; the copy's other weights are frozen, and only the adapters are saved.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from twistlm.conditioning import get_condition
from twistlm.errors import ConfigError, TwistLMError
from twistlm.lm import HFLM, LMState, ParticleLM
from twistlm.twists.base import Twist, TwistContext
from twistlm.twists.features import hf_prefix_hidden
from twistlm.twists.io import check_compatible, load_twist_state, max_index, read_config, read_weights

if TYPE_CHECKING:  # pragma: no cover
    from twistlm.target import Target
    from twistlm.twists.features import PrefixFeatures

Parent = tuple[torch.Tensor, bool]
"""How :meth:`AdaptedCopyTwist._sync` reached the new rows: (index of each row's cached row, whether a token was
appended to it). None instead: the state was rebuilt from the prompts."""


class _HiddenOnlyLM(HFLM):
    """HFLM's KV-cached prefill/step/reorder over a model, returning hidden states only (no (N, V) logits)."""

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        hidden = self._hidden_states(input_ids, attention_mask, position_ids, cache)[:, -1]
        return hidden, hidden.new_zeros(hidden.shape[0], 0), cache


class AdaptedCopyTwist(Twist):
    """A twist computing with a LoRA-adapted copy of ``model`` (see the module docstring); subclasses turn the copy's
    hidden state into log ψ."""

    def __init__(
        self,
        model: Any,
        eos_token_id: int,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: str | list[str] = "all-linear",
        base_model: str = "",
        condition: str = "prompt",
    ):
        super().__init__()
        get_condition(condition)  # refuses an unknown name
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
        self.hidden_size, self.vocab_size = int(head.weight.shape[1]), int(head.weight.shape[0])
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules
        self.base_model = base_model
        self.condition = condition
        self.eos_token_id = int(eos_token_id)
        self._runner = _HiddenOnlyLM(inner, SimpleNamespace(eos_token_id=self.eos_token_id), name=f"{self.kind}-twist")
        inner.train(self.training)
        self._prompt_ids: list[list[int]] | None = None  # what the copy reads, per target prompt
        self._base_prompt_ids: list[list[int]] | None = None  # the target's own prompts (p0's side)
        self._state: LMState | None = None
        self._keys: list[tuple[int, tuple[int, ...]]] = []
        self.num_rebuilds = 0  # full re-encodings of the prompts (one per sampler run when all goes to plan)

    @property
    def output_head(self) -> torch.nn.Module:
        """The copy's own LM head (frozen; LoRA's ``all-linear`` leaves the output layer out)."""
        return self.peft.get_base_model().get_output_embeddings()

    # -- incremental state (sampling) -------------------------------------------------------------------------------

    def start(self, target: Target | Sequence[Sequence[int]], num_particles: int | None = None) -> None:
        """Sampler hook: a run is about to start on ``target``'s prompts (or, for a twist reading the prompt only,
        these prompt ids); drops cached state."""
        prompt_ids = getattr(target, "prompt_ids", None)
        if prompt_ids is None:  # bare prompt ids
            if self.condition != "prompt":
                raise ConfigError(f"this {self.kind} twist reads the {self.condition!r} of each prompt: start it with "
                                  "the target, not bare prompt ids")
            prompt_ids = target
            read = prompt_ids
        else:
            read = get_condition(self.condition)(target)
        self._base_prompt_ids = [list(p) for p in prompt_ids]
        self._prompt_ids = [list(p) for p in read]
        self._state, self._keys = None, []

    def bind_target(self, target: Target) -> AdaptedCopyTwist:
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

    def _rows(self, prompt_index: torch.Tensor) -> list[list[int]]:
        """What the copy reads before each row's tokens (checked against the bound prompts)."""
        return self._lookup(self._prompt_ids, prompt_index)

    def base_rows(self, prompt_index: torch.Tensor) -> list[list[int]]:
        """The target's own prompt ids of each row (p0's context)."""
        return self._lookup(self._base_prompt_ids, prompt_index)

    def feature_rows(self, feats: PrefixFeatures) -> list[list[int]]:
        """What the copy reads before each row of stored features: the features' own prompts when it reads the
        prompt only (no binding needed), else the bound target's conditioned prompts."""
        if self.condition == "prompt":
            return [list(feats.prompt_ids[b]) for b in feats.prompt_index.tolist()]
        return self._rows(feats.prompt_index)

    def _lookup(self, table: list[list[int]] | None, prompt_index: torch.Tensor) -> list[list[int]]:
        if table is None:
            raise TwistLMError(
                f"the {self.kind} twist needs the prompts' token ids: call twist.bind_target(target) (or "
                "twist.start(target)) before sampling"
            )
        if max_index(prompt_index) >= len(table):
            raise TwistLMError(
                f"prompt index {int(prompt_index.max())} but the twist knows {len(table)} "
                "prompts (call twist.bind_target(target))"
            )
        return [table[b] for b in prompt_index.tolist()]

    def _rebuild(self, prompt_index: torch.Tensor, tokens: torch.Tensor) -> LMState:
        self._rows(prompt_index)
        self.num_rebuilds += 1
        state = self._runner.prefill(self._prompt_ids, 1)
        state = self._runner.reorder(state, prompt_index)
        for j in range(tokens.shape[1]):
            state = self._runner.step(state, tokens[:, j])
        return state

    def _sync(self, ctx: TwistContext) -> tuple[torch.Tensor, Parent | None]:
        """The adapted model's hidden state after s_<t for every row of ``ctx`` (advancing the cache), and how the
        rows were reached from the cached ones (:data:`Parent`; None: rebuilt)."""
        tokens, pidx = ctx.tokens.cpu(), ctx.prompt_index.cpu().long()
        keys = list(zip(pidx.tolist(), map(tuple, tokens.tolist())))
        depth = len(self._keys[0][1]) if self._keys else -1
        state, parent = None, None
        if ctx.step > 1 and self._state is not None and depth in (ctx.step - 1, ctx.step - 2):
            row_of = {k: i for i, k in enumerate(self._keys)}
            appended = depth == ctx.step - 2
            wanted = [(b, s[:-1]) for b, s in keys] if appended else keys
            index = [row_of.get(k) for k in wanted]
            if all(i is not None for i in index):
                parent = (torch.tensor(index, dtype=torch.long), appended)
                state = self._runner.reorder(self._state, parent[0])
                if appended:
                    state = self._runner.step(state, tokens[:, -1])
        if state is None:
            state = self._rebuild(pidx, tokens)
        self._state, self._keys = state, keys
        return state.hidden, parent

    # -- training -----------------------------------------------------------------------------------------------------

    def prefix_hidden(self, rows: Sequence[Sequence[int]], tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, H) the adapted copy's hidden states g_t(s_<t) over all prefixes of ``tokens`` (N, T): one forward
        over [prompt; s_1..s_T−1] per row (``rows``: each row's prompt ids), with grad as enabled."""
        inner = self.peft.get_base_model()
        return hf_prefix_hidden(inner.base_model, rows, tokens, self.eos_token_id, self.output_head.weight.device)

    # -- persistence --------------------------------------------------------------------------------------------------

    def twist_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained tensors only (the frozen copy of the base model is rebuilt from the base model on load)."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def adapter_config(self) -> dict:
        """The entries of ``twist_config.json`` that rebuild the adapted copy."""
        return {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "r": self.r,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "target_modules": self.target_modules,
            "base_model": self.base_model,
            "condition": self.condition,
        }

    @classmethod
    def init_options(cls, cfg: dict) -> dict:
        """Constructor arguments of the subclass's own, read back from ``twist_config.json``."""
        return {}

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, lm: ParticleLM | None = None) -> AdaptedCopyTwist:
        """Rebuild the adapted copy over ``lm`` (the base model it was trained for) and load the saved tensors."""
        cfg = read_config(directory, cls.kind)
        if not isinstance(lm, HFLM):
            raise ConfigError(f"loading a {cls.kind} twist needs its Hugging Face base model: load_twist(directory, lm)")
        check_compatible(cfg, lm, directory)
        twist = cls(lm.model, lm.eos_token_id, r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"],
                    target_modules=cfg["target_modules"], base_model=cfg.get("base_model", ""),
                    condition=cfg.get("condition", "prompt"), **cls.init_options(cfg))
        load_twist_state(twist, read_weights(directory))
        return twist
