"""Drawing trajectories from a policy, on- or off-policy (MATH.md, "Amortized inference"; REFERENCES (B)).

The policy's action distribution at a state s (the one every objective scores, see :class:`ActionSpace`) is the
model's next-token distribution restricted to the allowed vocabulary, with the stop tokens removed below ``min_len``
actions, and the stop forced at ``max_len`` actions. Exploration draws from a *behaviour* distribution instead:

* temperature τ: q_τ(v | s) ∝ q(v | s)^{1/τ} (off-policy tempered sampling; the loss still uses q itself); τ = 0
  is greedy decoding (argmax), for evaluation;
* ε-mixing: with probability ε the action is uniform over the allowed actions.

Tokens a tool returns (a calculator value after ``"3 + 4 ="``) are forced after the action that triggered it: they are
not actions. Stop tokens are not appended to the trajectory (``Trajectories.stop_token`` records which one ended it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from twistlm.errors import ConfigError, TwistLMError
from twistlm.gfn.trajectories import Trajectories
from twistlm.lm import ParticleLM
from twistlm.policy_proposal import policy_prompt_ids
from twistlm.resampling import categorical


@dataclass
class ActionSpace:
    """The policy's actions: ``allowed`` (V,) bool over tokens (stop tokens included), ``stop_ids`` the stop action
    ⊤, ``min_len`` / ``max_len`` bounds on the number of actions before ⊤. With ``stop_after_tool`` the stop is an
    action only right after a tool's output (e.g. after a calculator value: a rationale ends with a finished step),
    which also leaves the objectives far fewer states to score."""

    allowed: torch.Tensor
    stop_ids: tuple[int, ...]
    min_len: int
    max_len: int
    stop_after_tool: bool = False

    def __post_init__(self) -> None:
        if not self.stop_ids:
            raise ConfigError("the policy needs at least one stop token")
        if not 0 <= self.min_len <= self.max_len:
            raise ConfigError(f"need 0 ≤ min_len ≤ max_len, got {self.min_len} and {self.max_len}")
        self.allowed = self.allowed.clone()
        self.allowed[list(self.stop_ids)] = True
        self.is_stop = torch.zeros_like(self.allowed)
        self.is_stop[list(self.stop_ids)] = True

    def can_stop(self, actions_taken: torch.Tensor, after_tool: torch.Tensor) -> torch.Tensor:
        """(N,) bool: whether ⊤ is an action after ``actions_taken`` actions (``after_tool``: last token forced)."""
        ok = actions_taken >= self.min_len
        return ok & after_tool if self.stop_after_tool else ok

    def mask(self, actions_taken: torch.Tensor, after_tool: torch.Tensor) -> torch.Tensor:
        """(N, V) additive mask (0 or −∞) of the policy's distribution at N states."""
        allowed = self.allowed[None, :].expand(len(actions_taken), -1).clone()
        allowed[~self.can_stop(actions_taken, after_tool)] &= ~self.is_stop
        out = torch.zeros(allowed.shape)
        out[~allowed] = float("-inf")
        return out

    def log_probs(self, logprobs: torch.Tensor, actions_taken: torch.Tensor, after_tool: torch.Tensor) -> torch.Tensor:
        """log q(v | s): the model's log-probabilities (N, V) restricted and renormalised (differentiable)."""
        mask = self.mask(actions_taken.cpu(), after_tool.cpu()).to(logprobs.device)
        return torch.log_softmax(logprobs + mask, dim=-1)


@torch.inference_mode()
def sample_trajectories(
    lm: ParticleLM,
    prompts: Sequence[Sequence[int]],
    num_samples: int,
    space: ActionSpace,
    generator: torch.Generator,
    *,
    temperature: float = 1.0,
    epsilon: float = 0.0,
    tool=None,
    source: str = "policy",
) -> Trajectories:
    """``num_samples`` trajectories per prompt (row b·K + k is sample k of prompt b) from ``lm`` (the policy)."""
    if not temperature >= 0:
        raise ConfigError(f"temperature must be ≥ 0 (0: greedy), got {temperature}")
    B, K = len(prompts), num_samples
    N = B * K
    state = lm.prefill(list(prompts), K)
    trigger = torch.zeros(lm.vocab_size, dtype=torch.bool)
    if tool is not None:
        trigger[tool.trigger_ids(lm)] = True
    tokens: list[list[int]] = [[] for _ in range(N)]
    forced: list[list[bool]] = [[] for _ in range(N)]
    pending: list[list[int]] = [[] for _ in range(N)]
    actions = torch.zeros(N, dtype=torch.long)
    after_tool = torch.zeros(N, dtype=torch.bool)
    done = torch.zeros(N, dtype=torch.bool)
    stop_token = [-1] * N
    stopped = [False] * N
    while not bool(done.all()):
        logq = space.log_probs(state.logprobs.float().cpu(), actions, after_tool)
        if torch.isnan(logq[~done]).any():
            raise TwistLMError("the policy's log-probabilities are NaN (diverged weights?); lower the learning rate")
        if temperature == 0:
            draw = logq.argmax(dim=-1)
        else:
            behaviour = torch.softmax(logq / temperature, dim=-1)
            if epsilon > 0:
                uniform = torch.isfinite(logq).float()
                behaviour = (1 - epsilon) * behaviour + epsilon * uniform / uniform.sum(-1, keepdim=True)
            draw = categorical(behaviour, generator)
        feed = torch.full((N,), lm.eos_token_id, dtype=torch.long)
        for r in range(N):
            if done[r]:
                continue
            if pending[r]:
                tok = pending[r].pop(0)
                tokens[r].append(tok)
                forced[r].append(True)
                feed[r] = tok
                after_tool[r] = not pending[r]
                continue
            if int(actions[r]) >= space.max_len:
                done[r] = True  # the stop is forced at max_len (a cut: no stop token)
                continue
            tok = int(draw[r])
            if space.is_stop[tok]:
                done[r], stopped[r], stop_token[r] = True, True, tok
                continue
            tokens[r].append(tok)
            forced[r].append(False)
            after_tool[r] = False
            actions[r] += 1
            feed[r] = tok
            if trigger[tok]:
                out = tool(lm.decode(tokens[r]))
                if out:
                    pending[r] = lm.tokenize(out)
        if bool(done.all()):
            break
        state = lm.step(state, feed)
    prompt_index = [r // K for r in range(N)]
    return Trajectories(tokens, forced, prompt_index, stopped, stop_token, [source] * N)


def policy_decoder(space: ActionSpace):
    """A ``decoder`` for :func:`twistlm.solve.solve`: draws from the target's LM (a policy) *within its action
    space*, the distribution the policy was trained as; texts include the stop token. Greedy (τ = 0) runs once."""

    def decode(target, samples: int, temperature: float, generator: torch.Generator) -> list[list[str]]:
        n = 1 if temperature == 0 else samples
        prompts = policy_prompt_ids(target.lm, target)  # the policy's own prompts (it may read the observation)
        trajs = sample_trajectories(target.lm, prompts, n, space, generator, temperature=temperature, tool=target.tool)
        texts: list[list[str]] = [[] for _ in range(target.num_prompts)]
        for toks, stop, b in zip(trajs.tokens, trajs.stop_token, trajs.prompt_index):
            texts[b].append(target.lm.decode(toks + ([stop] if stop >= 0 else [])))
        return [t * samples for t in texts] if temperature == 0 else texts

    return decode
