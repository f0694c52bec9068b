"""Trajectories of the policy and their states (MATH.md, "Amortized inference").

A trajectory for prompt x is the token sequence z = z_1 … z_L the policy produced, then ⊤ (a stop token) or a cut
at the maximum length. Some tokens are *forced* (spliced in by a tool, e.g. a calculator value after ``"3 + 4 ="``):
they are not actions — they have probability 1 under the policy and the base model alike and never count towards
the length.

States. The GFlowNet's states are the prefixes at which the policy acts: the empty prefix and every prefix that ends
right after an action and its forced tokens, i.e. prefix lengths m with z_{m+1} not forced (or m = L). State s_i
(i = 0 … A, A = number of actions) has ``state_len[i]`` tokens; the transition s_i → s_{i+1} emits the action token
z_{state_len[i] + 1} (followed by its forced tokens). A state is *terminable* when the policy may stop there: at least
``min_len`` actions taken. At ``max_len`` actions the stop is forced: log q(⊤ | s_A) = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Trajectories:
    """n trajectories. ``tokens[i]``: every token (actions and forced ones, no stop token); ``forced[i]``: per-token
    flags; ``prompt_index[i]``: which prompt (row of the batch's prompt list); ``stopped[i]``: ended by ⊤ (else cut
    at ``max_len`` actions); ``stop_token[i]``: the stop token drawn (−1 if cut)."""

    tokens: list[list[int]]
    forced: list[list[bool]]
    prompt_index: list[int]
    stopped: list[bool]
    stop_token: list[int]
    source: list[str] = field(default_factory=list)
    """Where each trajectory came from (``policy``, ``tempered``, ``replay``, ``given``), for logging."""

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if not (len(self.forced) == len(self.prompt_index) == len(self.stopped) == len(self.stop_token) == n):
            raise ValueError("trajectory fields have different lengths")
        if not self.source:
            self.source = ["policy"] * n

    def __len__(self) -> int:
        return len(self.tokens)

    def state_lengths(self, i: int) -> list[int]:
        """Prefix lengths (in tokens) of the states of trajectory i: 0 and every length after an action's forced run."""
        toks, forced = self.tokens[i], self.forced[i]
        out = [m for m in range(len(toks) + 1) if m == len(toks) or not forced[m]]
        # The empty prefix is a state even if the first token were forced (tools only answer to actions).
        return out if out and out[0] == 0 else [0] + out

    def num_actions(self, i: int) -> int:
        return sum(1 for f in self.forced[i] if not f)

    def concat(self, other: Trajectories) -> Trajectories:
        return Trajectories(
            self.tokens + other.tokens,
            self.forced + other.forced,
            self.prompt_index + other.prompt_index,
            self.stopped + other.stopped,
            self.stop_token + other.stop_token,
            self.source + other.source,
        )

    def select(self, rows: Sequence[int]) -> Trajectories:
        return Trajectories(
            [self.tokens[r] for r in rows],
            [self.forced[r] for r in rows],
            [self.prompt_index[r] for r in rows],
            [self.stopped[r] for r in rows],
            [self.stop_token[r] for r in rows],
            [self.source[r] for r in rows],
        )


@dataclass
class StateBatch:
    """Per-state tensors of a batch, padded to S = max states; the objectives read only these.

    action_lp: (n, S) log q(action of s_i → s_{i+1}) (0 at i ≥ A).
    stop_lp: (n, S) log q(⊤ | s_i) (0 where stopping is forced, i.e. at s_A of a cut trajectory).
    log_reward: (n, S) log R(s_i ⊤) (any value where not terminable).
    terminable: (n, S) bool, the policy may stop at s_i (and s_i exists).
    last: (n,) long, index A of the final state.
    group: (n,) long, the prompt of each trajectory (None: all one prompt).
    """

    action_lp: torch.Tensor
    stop_lp: torch.Tensor
    log_reward: torch.Tensor
    terminable: torch.Tensor
    last: torch.Tensor
    group: torch.Tensor | None = None

    def trajectory_log_q(self) -> torch.Tensor:
        """log q(z ⊤) = Σ action log-probs + log q(⊤ | s_A), (n,)."""
        idx = self.last[:, None]
        return self.action_lp.sum(1) + self.stop_lp.gather(1, idx).squeeze(1)

    def final_log_reward(self) -> torch.Tensor:
        return self.log_reward.gather(1, self.last[:, None]).squeeze(1)


def state_index(trajs: Trajectories, min_len: int, stop_after_tool: bool = False
                ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """State prefix lengths per trajectory, the (n, S) terminable mask and the (n,) last-state index.

    A state is terminable when the policy may stop there (``min_len`` actions taken and, with ``stop_after_tool``,
    the prefix ends with a tool's output), and the final state always is (a stop, or a cut at max_len)."""
    lengths = [trajs.state_lengths(i) for i in range(len(trajs))]
    S = max(len(s) for s in lengths)
    terminable = torch.zeros(len(trajs), S, dtype=torch.bool)
    last = torch.zeros(len(trajs), dtype=torch.long)
    for i, states in enumerate(lengths):
        A = len(states) - 1
        last[i] = A
        for a, m in enumerate(states):
            after_tool = m > 0 and trajs.forced[i][m - 1]
            terminable[i, a] = a >= min_len and (after_tool or not stop_after_tool)
        terminable[i, A] = True  # where it ended (a given trajectory may end anywhere)
    return lengths, terminable, last
