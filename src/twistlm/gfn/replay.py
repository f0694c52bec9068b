"""Reward-prioritised replay of trajectories, per prompt (REFERENCES (B), "Replay").

For each prompt key (its row in the training dataset) the buffer keeps at most ``capacity`` distinct trajectories
with their *untempered* final log-reward, dropping the lowest-reward one when full. Duplicates are recognised by
their tokens, or — with ``dedup_distance`` d > 0 — when the token edit distance is below d·(len₁ + len₂); the
higher-reward copy is kept. Sampling draws with replacement ∝ exp(log R / T) (T the current reward temperature), or
all items when there are no more than asked for. Rewards of replayed trajectories are recomputed by the trainer (the
base model is frozen, so the values agree); only the priority uses the stored value.

Off-policy training from replay does not move the optimum of SubTB/TB: their residuals vanish for every trajectory
at q ∝ R, whatever distribution the trajectories are drawn from.

The buffer's state is plain lists of numbers (``torch.load(weights_only=True)`` reads it back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from twistlm.errors import ConfigError
from twistlm.gfn.trajectories import Trajectories


def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token sequences (O(|a|·|b|), sequences here are short)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


class ReplayBuffer:
    """Per-key bounded, de-duplicated, reward-prioritised trajectories (module docstring)."""

    def __init__(self, capacity: int = 50, dedup_distance: float = 0.0):
        if capacity < 1:
            raise ConfigError(f"replay capacity must be ≥ 1, got {capacity}")
        if not 0.0 <= dedup_distance < 1.0:
            raise ConfigError(f"dedup_distance must lie in [0, 1), got {dedup_distance}")
        self.capacity = int(capacity)
        self.dedup_distance = float(dedup_distance)
        self.items: dict[int, list[tuple[float, list[int], list[bool], bool, int]]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    def size(self, key: int) -> int:
        return len(self.items.get(key, []))

    def _same(self, a: list[int], b: list[int]) -> bool:
        if self.dedup_distance <= 0:
            return a == b
        return edit_distance(a, b) < self.dedup_distance * (len(a) + len(b)) or a == b

    def add(self, key: int, tokens: list[int], forced: list[bool], stopped: bool, stop_token: int,
            log_reward: float) -> bool:
        """Insert one trajectory; returns whether the buffer changed."""
        if not torch.isfinite(torch.tensor(log_reward)):
            return False
        bucket = self.items.setdefault(int(key), [])
        for k, item in enumerate(bucket):
            if self._same(item[1], tokens):
                if log_reward > item[0]:
                    bucket[k] = (float(log_reward), list(tokens), list(forced), bool(stopped), int(stop_token))
                    return True
                return False
        if len(bucket) >= self.capacity:
            worst = min(range(len(bucket)), key=lambda k: bucket[k][0])
            if bucket[worst][0] >= log_reward:
                return False
            bucket.pop(worst)
        bucket.append((float(log_reward), list(tokens), list(forced), bool(stopped), int(stop_token)))
        return True

    def add_batch(self, keys: Sequence[int], trajs: Trajectories, log_rewards: torch.Tensor) -> None:
        for i in range(len(trajs)):
            self.add(keys[trajs.prompt_index[i]], trajs.tokens[i], trajs.forced[i], trajs.stopped[i],
                     trajs.stop_token[i], float(log_rewards[i]))

    def sample(self, keys: Sequence[int], per_key: int, generator: torch.Generator,
               temperature: float = 1.0) -> Trajectories | None:
        """``per_key`` trajectories for each key (prompt index = position in ``keys``); None if a key is empty."""
        out = Trajectories([], [], [], [], [], [])
        for b, key in enumerate(keys):
            bucket = self.items.get(int(key), [])
            if not bucket:
                return None
            if len(bucket) <= per_key:
                chosen = list(range(len(bucket)))
                chosen += [chosen[i % len(chosen)] for i in range(per_key - len(chosen))]
            else:
                logits = torch.tensor([it[0] for it in bucket], dtype=torch.float64) / temperature
                probs = torch.softmax(logits, dim=0)
                chosen = torch.multinomial(probs, per_key, replacement=True, generator=generator).tolist()
            for c in chosen:
                _, toks, fl, stopped, stop = bucket[c]
                out = out.concat(Trajectories([list(toks)], [list(fl)], [b], [stopped], [stop], ["replay"]))
        return out

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "dedup_distance": self.dedup_distance,
            "keys": list(self.items),
            "items": [[[r, t, [int(x) for x in f], int(s), st] for r, t, f, s, st in self.items[k]]
                      for k in self.items],
        }

    def load_state_dict(self, state: dict) -> None:
        self.capacity = int(state["capacity"])
        self.dedup_distance = float(state["dedup_distance"])
        self.items = {
            int(k): [(float(r), list(t), [bool(x) for x in f], bool(s), int(st)) for r, t, f, s, st in bucket]
            for k, bucket in zip(state["keys"], state["items"])
        }
