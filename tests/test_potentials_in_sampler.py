"""LM-based potentials inside a sampler reuse its state (KV cache rows, log p0) and agree with scoring from scratch."""

from __future__ import annotations

import pytest
import torch

import twistlm
from twistlm.potentials.base import Sequences
from twistlm.potentials.likelihood import InfillingPotential, TemperedPotential


class Recorder(twistlm.Potential):
    """Wraps a potential; records each batch it saw and what the inner potential returned."""

    def __init__(self, inner):
        self.inner, self.name, self.bounded, self.calls = inner, inner.name, inner.bounded, []

    def log_phi(self, seqs):
        values = self.inner(seqs)
        self.calls.append((seqs, values))
        return values


def rescored(inner, seqs: Sequences) -> torch.Tensor:
    """The same batch with the sampler's context stripped: the potential must score it from scratch."""
    plain = Sequences(seqs.prompts, seqs.texts, seqs.token_ids, seqs.prompt_index, seqs.extras, seqs.prompt_ids)
    return inner(plain)


def check(lm, inner, prompts, T, atol):
    rec = Recorder(inner)
    target = twistlm.Target(lm, prompts=prompts, potential=rec, max_new_tokens=T)
    twistlm.run_smc(target, 6, seed=0)
    assert rec.calls and any(s.lm_state is not None for s, _ in rec.calls)
    for seqs, values in rec.calls:
        assert torch.allclose(values, rescored(inner, seqs), atol=atol), (values, rescored(inner, seqs))


def test_toy_infilling_and_tempered_match_rescoring():
    lm = twistlm.ToyLM(vocab_size=5, seed=1, eos_bias=0.5)  # some particles stop early at EOS
    check(lm, InfillingPotential(lm, observation=[1, 2]), ["a", "bd"], 4, 1e-9)
    check(lm, TemperedPotential(lm, tau=0.5, max_new_tokens=4), ["a", "bd"], 4, 1e-9)


@pytest.mark.model
def test_real_model_infilling_and_tempered_match_rescoring(smol):
    prompts = ["Once upon a time", "The weather today is"]
    check(smol, InfillingPotential(smol, observation=" They lived happily ever after."), prompts, 5, 2e-3)
    check(smol, TemperedPotential(smol, tau=0.7, max_new_tokens=5), prompts, 5, 2e-3)
