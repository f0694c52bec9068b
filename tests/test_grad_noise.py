"""Gradient noise of a twist loss (twistlm.grad_noise): the statistics against known answers, then on a toy trainer."""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm import Target
from twistlm.errors import ConfigError
from twistlm.grad_noise import gradient_noise, summarise
from twistlm.training import TwistTrainer, TwistTrainingConfig
from twistlm.twists.tabular import TabularTwist

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summarise_recovers_a_known_signal_and_noise():
    """g_i = G + ε_i with ‖G‖² = 4 and E‖ε‖² = 50 (50 coordinates of unit variance): both recovered within their
    errors, and the noise scale is K · 50 / 4."""
    gen = torch.Generator().manual_seed(0)
    G = torch.zeros(50, dtype=torch.float64)
    G[:4] = 1.0
    grads = G + torch.randn(2000, 50, generator=gen, dtype=torch.float64)
    out = summarise(grads, particles=8)
    assert abs(out.signal - 4.0) < 3 * out.signal_se and out.signal_se < 0.3
    assert out.noise == pytest.approx(50.0, rel=0.03)
    assert out.snr == pytest.approx(4 / 50, rel=0.15) and out.noise_scale == pytest.approx(8 * 50 / 4, rel=0.15)


def test_summarise_without_signal_is_centred_on_zero():
    gen = torch.Generator().manual_seed(1)
    out = summarise(torch.randn(400, 30, generator=gen, dtype=torch.float64), particles=4)
    assert abs(out.signal) < 3 * out.signal_se
    assert math.isinf(out.noise_scale) or out.noise_scale > 100 * 4  # no measurable signal: a huge or infinite scale


def test_summarise_refuses_too_few_batches():
    with pytest.raises(ConfigError, match="at least 3 batches"):
        summarise(torch.zeros(2, 5), particles=1)


class Tail(twistlm.potentials.Potential):
    name = "tail"
    bounded = True

    def log_phi(self, seqs):
        return torch.tensor([math.log(0.05 + 0.95 * (2 in ids)) for ids in seqs.token_ids], dtype=torch.float64)


@pytest.fixture(scope="module")
def target():
    return Target(twistlm.ToyLM(vocab_size=5, seed=1), prompt="a", potential=Tail(), max_new_tokens=3)


def noise_at(target, particles: int):
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    cfg = TwistTrainingConfig(output_dir="unused", loss="ctl", num_particles=particles, positives="exact", plot=False)
    before = [p.detach().clone() for p in twist.parameters()]
    out = gradient_noise(TwistTrainer(twist, target, cfg), batches=40)
    assert all(torch.equal(a, b) for a, b in zip(before, twist.parameters()))  # measuring does not train
    return out


def test_noise_falls_as_one_over_the_batch_and_the_signal_stays(target):
    """CTL on the toy with exact positives: quadrupling K quarters the per-batch noise (0.32× here) while ‖E g‖²
    stays up to the O(1/K) bias of CTL's self-normalised negatives (0.36 vs 0.47), so the noise scale in samples is
    about the same at both K (16.0 and 16.1)."""
    small, large = noise_at(target, 16), noise_at(target, 64)
    assert 0.15 < large.noise / small.noise < 0.4
    assert small.signal > 3 * small.signal_se and large.signal > 3 * large.signal_se
    assert large.signal == pytest.approx(small.signal, rel=0.45)  # CTL's self-normalised negatives: O(1/K) bias
    assert large.noise_scale == pytest.approx(small.noise_scale, rel=0.6)


def test_gradient_noise_needs_three_batches(target):
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    trainer = TwistTrainer(twist, target, TwistTrainingConfig(output_dir="unused", loss="ctl", positives="exact",
                                                              plot=False))
    with pytest.raises(ConfigError, match="batches must be at least 3"):
        gradient_noise(trainer, 2)
