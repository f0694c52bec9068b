"""Positive sources (twistlm.positives): the replay buffer's bookkeeping and draws, the registry, errors."""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm import Target
from twistlm.errors import ConfigError
from twistlm.positives import (
    POSITIVE_SOURCES,
    BufferPositives,
    PositiveRequest,
    Samples,
    get_positive_source,
    pad_groups,
)
from twistlm.potentials.base import Potential


class HasB(Potential):
    name = "has-b"
    bounded = True

    def log_phi(self, seqs):
        return torch.tensor([0.0 if 1 in ids else -math.inf for ids in seqs.token_ids], dtype=torch.float64)


@pytest.fixture(scope="module")
def target():
    return Target(twistlm.ToyLM(vocab_size=5, seed=1), prompts=["a", "b"], potential=HasB(), max_new_tokens=3)


def _samples(rows, B=2):
    seqs = [r[0] for r in rows]
    log_phi = torch.tensor([r[1] for r in rows], dtype=torch.float64).view(B, -1)
    return Samples(seqs, log_phi, torch.zeros_like(log_phi))


def test_buffer_keeps_weighted_draws_per_prompt_and_drops_the_oldest(target):
    buf = BufferPositives(target, capacity=3)
    rows = [([1], 0.0), ([2], -math.inf), ([1, 2], -0.5), ([1], 0.0)]  # prompt 0: rows 0-1, prompt 1: rows 2-3
    buf.observe(_samples(rows), torch.tensor([[-1.0, -math.inf], [-3.0, -1.5]], dtype=torch.float64))
    assert buf.size(0) == 1 and buf.size(1) == 2  # weight 0 (φ = 0) is never kept
    assert buf.entries[1][0] == ([1, 2], -3.0, -0.5)
    buf.observe(_samples([([1, 1], 0.0), ([1], 0.0), ([1, 3], 0.0), ([1], 0.0)]),
                torch.tensor([[-0.2, -1.0], [-9.0, 0.0]], dtype=torch.float64))  # fmt: skip
    assert [e[0] for e in buf.entries[0]] == [[1], [1, 1], [1]]  # repeated draws are separate draws
    assert [e[0] for e in buf.entries[1]] == [[1], [1, 3], [1]]  # capacity 3: the oldest ([1, 2]) is dropped


def test_buffer_draws_proportional_to_importance_weight_and_pads_empty_groups(target):
    buf = BufferPositives(target)
    log_w = torch.tensor([[math.log(0.3), math.log(0.1)], [-math.inf, -math.inf]], dtype=torch.float64)
    buf.observe(_samples([([1], 0.0), ([1, 1], 0.0), ([2], -math.inf), ([3], -math.inf)]), log_w)
    gen = torch.Generator().manual_seed(0)
    out = buf.draw(PositiveRequest(target, None, 4000, gen))
    assert out.log_phi.shape == (2, 4000)
    frac = sum(s == [1] for s in out.sequences[:4000]) / 4000
    assert abs(frac - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 4000)  # ∝ w: 0.3 / (0.3 + 0.1)
    assert torch.isinf(out.log_weight[1]).all() and out.log_weight[1].lt(0).all()  # no positive for prompt 1 yet
    assert torch.equal(out.log_weight[0], torch.zeros(4000, dtype=torch.float64))


def test_buffer_state_round_trip(target):
    buf = BufferPositives(target, capacity=7)
    buf.observe(_samples([([1], 0.0), ([1, 4], 0.0), ([1, 1, 1], -0.1), ([2], -math.inf)]),
                torch.full((2, 2), -1.0, dtype=torch.float64))  # fmt: skip
    again = BufferPositives(target)
    again.load_state_dict(buf.state_dict())
    assert again.capacity == 7 and again.entries == buf.entries


def test_pad_groups_and_registry(target):
    out = pad_groups([[([1], 0.0)], []], filler=[0])
    assert out.sequences == [[1], [0]] and out.log_weight[1, 0] == -math.inf
    assert set(POSITIVE_SOURCES) == {"exact", "observed", "smc", "rejection", "buffer"}
    with pytest.raises(ConfigError, match="unknown positives source 'oracle'.*buffer"):
        get_positive_source("oracle", target)
