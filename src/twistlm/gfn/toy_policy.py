"""A tabular policy over an enumerable toy target, for exactness tests of the GFlowNet objectives.

q_θ(v | x, z_1:m) = softmax(log p0(v | x, z_1:m) + θ[x, z_1:m])_v with one free logit vector per (prompt, prefix),
zero-initialised (q = p0 at the start). Rows are handed out to prefixes as they are first met (``capacity`` rows in
all; the assignment is saved with the weights). It can represent any policy, so an objective whose optimum is
q ∝ R must drive it there. It exposes the same members as :class:`~twistlm.gfn.policy.LoRAPolicy`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from twistlm.errors import ConfigError
from twistlm.lm import LMState, ParticleLM, Prompt

DEFAULT_CAPACITY = 4096


class _PolicyLM(ParticleLM):
    """The base LM with the table's offsets added: what the sampler draws from."""

    def __init__(self, owner: TabularPolicy):
        self.owner = owner
        self.base_lm = owner.base_lm
        self.name = self.base_lm.name

    @property
    def vocab_size(self) -> int:
        return self.base_lm.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.base_lm.eos_token_id

    @property
    def hidden_size(self) -> int:
        return self.base_lm.hidden_size

    def encode(self, prompt: Prompt) -> list[int]:
        return self.base_lm.encode(prompt)

    def tokenize(self, text: str) -> list[int]:
        return self.base_lm.tokenize(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.base_lm.decode(token_ids)

    def _wrap(self, state: LMState, keys: list[tuple]) -> LMState:
        if self.owner.enabled:
            # In the LM's dtype: float64 on the toy LM, so a policy set to σ's conditionals is exact to float64.
            offsets = torch.stack([self.owner.offset(k) for k in keys]).detach().to(state.logprobs.dtype)
            logprobs = torch.log_softmax(state.logprobs + offsets, dim=-1)
        else:
            logprobs = state.logprobs
        return LMState(logprobs=logprobs, hidden=state.hidden, backend={"inner": state, "keys": keys})

    def prefill(self, prompt_ids, num_particles: int) -> LMState:
        state = self.base_lm.prefill(prompt_ids, num_particles)
        keys = [(tuple(p),) for p in prompt_ids for _ in range(num_particles)]
        return self._wrap(state, keys)

    def step(self, state: LMState, tokens: torch.Tensor) -> LMState:
        inner = self.base_lm.step(state.backend["inner"], tokens)
        keys = [k + (int(t),) for k, t in zip(state.backend["keys"], tokens.tolist())]
        return self._wrap(inner, keys)

    def reorder(self, state: LMState, index: torch.Tensor) -> LMState:
        inner = self.base_lm.reorder(state.backend["inner"], index)
        return self._wrap(inner, [state.backend["keys"][i] for i in index.tolist()])


class TabularPolicy(torch.nn.Module):
    """One logit offset per (prompt, prefix) over ``base_lm``'s vocabulary, ``capacity`` prefixes (module docstring)."""

    def __init__(self, base_lm: ParticleLM, capacity: int = DEFAULT_CAPACITY):
        super().__init__()
        self.base_lm = base_lm
        self.index: dict[tuple, int] = {}
        self.table = torch.nn.Parameter(torch.zeros(capacity, base_lm.vocab_size, dtype=torch.float64))
        self.enabled = True
        self.lm = _PolicyLM(self)

    def row(self, key: tuple) -> int:
        if key not in self.index:
            if len(self.index) >= self.table.shape[0]:
                raise ConfigError(f"the tabular policy is full ({self.table.shape[0]} prefixes)")
            self.index[key] = len(self.index)
        return self.index[key]

    def offset(self, key: tuple) -> torch.Tensor:
        return self.table[self.row(key)]

    @contextlib.contextmanager
    def base(self):
        self.enabled = False
        try:
            yield self.lm
        finally:
            self.enabled = True

    def log_probs_at(self, prompts, trajs, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        out = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            prefix = trajs.tokens[r][:c]
            state = self.base_lm.prefill([list(prompts[trajs.prompt_index[r]]) + prefix], 1)
            key = (tuple(prompts[trajs.prompt_index[r]]),) + tuple(prefix)
            out.append(torch.log_softmax(state.logprobs[0].double() + self.table[self.row(key)], dim=-1))
        return torch.stack(out)

    def save_pretrained(self, directory, **_) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"table": self.table.detach().contiguous()}, str(Path(directory) / "policy.safetensors"))
        keys = sorted(self.index, key=self.index.get)
        (Path(directory) / "policy_index.json").write_text(json.dumps([[list(k[0]), *k[1:]] for k in keys]))

    def load_weights(self, directory) -> None:
        from safetensors.torch import load_file

        with torch.no_grad():
            self.table.copy_(load_file(str(Path(directory) / "policy.safetensors"))["table"])
        keys = json.loads((Path(directory) / "policy_index.json").read_text())
        self.index = {(tuple(k[0]), *k[1:]): i for i, k in enumerate(keys)}
