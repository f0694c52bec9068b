"""Twist losses on the toy LM, against exact answers (MATH.md, "Twist losses").

The heart: trained from a random init, each of CTL / RL / SIXO / FUDGE drives the twist-induced proposal q to σ,
measured by the exact KL(σ‖q) = Σ_s σ(s) (log σ(s) − log q(s)) over every sequence s. log q(s) comes from the sampler
itself: a K = 1 conditional SMC run clamped to s (no resampling) has log_weights[0] = log σ̃(s) − log q(s) exactly;
all sequences run at once as B groups.

Training budget of the tabular tests (toy LM V = 5, T = 4, 341 sequences): 400 updates, 64 negatives (and 64 exact
positives where the loss needs them) per update, AdamW lr 0.2 with linear decay. The MLP test: 500 updates, lr 0.01.

Besides training, each loss is checked at its optimum with exact expectations (the whole enumeration as the
sample, weighted by p0 or σ): the gradient vanishes at ψ* (ψ*/Z for SIXO), the RL loss is 0, and the CTL
surrogate's gradient equals the gradient of the exact objective Σ_t KL(σ(s_1:t) ‖ π_t).
"""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm import OptimalTwist, Target, enumerate_target, run_smc
from twistlm.errors import ConfigError
from twistlm.losses import (
    LOSSES,
    Rollouts,
    ctl_loss,
    fudge_labels,
    fudge_loss,
    get_loss,
    jeffreys_loss,
    make_rollouts,
    rl_loss,
    safe_softmax,
    sixo_loss,
)
from twistlm.potentials.base import Potential
from twistlm.training import TwistTrainer, TwistTrainingConfig
from twistlm.twists.embedding import EmbeddingTwist
from twistlm.twists.features import prefix_features, prefix_log_psi
from twistlm.twists.mlp import MLPTwist
from twistlm.twists.tabular import TabularTwist

T = 4
KL_GOAL = 0.05

pytestmark = pytest.mark.usefixtures("one_thread")


class SoftB(Potential):
    """φ(s) = (0.02 + 0.98·1['b' ∈ s]) · (0.3 + 0.7·1[|s| ≥ 2]) ∈ (0, 1]: σ is far from p0 (KL(σ‖p0) ≈ 1.14)."""

    name = "soft-b"
    bounded = True

    def log_phi(self, seqs):
        out = [math.log((0.02 + 0.98 * (1 in ids)) * (0.3 + 0.7 * (len(ids) >= 2))) for ids in seqs.token_ids]
        return torch.tensor(out, dtype=torch.float64)


class Unbounded(Potential):
    name = "unbounded"

    def log_phi(self, seqs):
        return torch.tensor([0.5 * len(ids) for ids in seqs.token_ids], dtype=torch.float64)


@pytest.fixture(scope="module")
def lm():
    return twistlm.ToyLM(vocab_size=5, seed=1)


@pytest.fixture(scope="module")
def target(lm):
    return Target(lm, prompt="a", potential=SoftB(), max_new_tokens=T)


@pytest.fixture(scope="module")
def exact(target):
    return enumerate_target(target)


def exact_kl(target: Target, twist, exact=None) -> float:
    """KL(σ‖q) of the twist-induced proposal, exactly: log q(s) from one clamped K = 1 run per sequence."""
    exact = exact or enumerate_target(target)
    seqs = [list(s) for s in exact.sequences]
    groups = Target(
        target.lm,
        prompts=[target.prompts[0]] * len(seqs),
        potential=target.potential,
        max_new_tokens=target.max_new_tokens,
    )
    results = run_smc(groups, 1, proposal="twisted", twist=twist, ess_threshold=0.0, reference=seqs)
    log_w = torch.stack([r.log_weights[0] for r in results])  # log σ̃(s) − log q(s)
    log_q = exact.log_p0 + exact.log_phi - log_w
    sigma = exact.probs
    keep = sigma > 0
    return float((sigma[keep] * (sigma[keep].log() - log_q[keep])).sum())


def kl_sigma_p0(exact) -> float:
    sigma = exact.probs
    return float((sigma * (sigma.log() - exact.log_p0)).sum())


def full_rollouts(target, exact, twist, weight: str) -> Rollouts:
    """Every sequence once, data-weighted by p0 (an exact 'p0 sample') or σ (an exact 'σ sample')."""
    seqs = [list(s) for s in exact.sequences]
    feats = prefix_features(target.lm, target.prompt_ids, seqs, prompt_index=[0] * len(seqs), max_new_tokens=T)
    log_weight = exact.log_p0 if weight == "p0" else exact.log_p0 + exact.log_phi
    return make_rollouts(feats, prefix_log_psi(twist, feats), exact.log_phi, 1, log_weight=log_weight[None])


def optimal_table(target, exact, shift: float = 0.0) -> TabularTwist:
    twist = TabularTwist.from_optimal(OptimalTwist(exact, target.lm.vocab_size), target)
    with torch.no_grad():
        twist.table -= shift
    return twist


def table_grad(twist, loss) -> torch.Tensor:
    twist.zero_grad()
    loss.backward()
    return twist.table.grad


# ------------------------------------------------------------------------------------------------ the KL measure


def test_exact_kl_measure(target, exact):
    """The cSMC-based KL is 0 for ψ* and KL(σ‖p0) for ψ ≡ 1 (q = p0)."""
    assert exact_kl(target, OptimalTwist(exact, 5), exact) == pytest.approx(0.0, abs=1e-10)
    flat = TabularTwist.for_target(target)
    assert exact_kl(target, flat, exact) == pytest.approx(kl_sigma_p0(exact), abs=1e-10)


def test_tabular_twist_represents_optimal_twist(target, exact):
    twist = optimal_table(target, exact)
    assert exact_kl(target, twist, exact) == pytest.approx(0.0, abs=1e-10)
    result = run_smc(target, 16, proposal="twisted", twist=twist, seed=0)[0]
    assert result.log_z == pytest.approx(exact.log_z, abs=1e-9)  # every weight equals Z


def test_features_reproduce_the_samplers_proposal(target, exact):
    """log q(s) summed from prefix features equals the sampler's log σ̃(s) − log w(s), for a random twist."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=3)
    seqs = [list(s) for s in exact.sequences]
    feats = prefix_features(target.lm, target.prompt_ids, seqs, prompt_index=[0] * len(seqs), max_new_tokens=T)
    hidden, logp0, mask = feats
    assert hidden.shape == (len(seqs), T, 8) and logp0.shape == (len(seqs), T, 5) and mask.shape == (len(seqs), T)
    r = make_rollouts(feats, prefix_log_psi(twist, feats), exact.log_phi, 1, proposal="twisted")
    log_q = r.log_q.sum(dim=2)[0]
    groups = Target(target.lm, prompts=["a"] * len(seqs), potential=target.potential, max_new_tokens=T)
    results = run_smc(groups, 1, proposal="twisted", twist=twist, ess_threshold=0.0, reference=seqs)
    sampler_log_q = exact.log_p0 + exact.log_phi - torch.stack([x.log_weights[0] for x in results])
    assert torch.allclose(log_q, sampler_log_q, atol=1e-10)
    assert torch.allclose(r.log_p0.sum(dim=2)[0], exact.log_p0, atol=1e-10)


# -------------------------------------------------------------------------------------- optima (exact expectations)


def test_ctl_gradient_is_the_exact_kl_gradient(target, exact):
    """With all sequences as positives (weights σ) and negatives (weights p0), the CTL surrogate's gradient is the
    gradient of Σ_t KL(σ(s_1:t) ‖ π_t^θ) — computed here independently from its definition."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=5)
    pos, neg = full_rollouts(target, exact, twist, "sigma"), full_rollouts(target, exact, twist, "p0")
    surrogate = LOSSES["ctl"].compute(neg, pos, None)
    grad = table_grad(twist, surrogate).clone()

    # Σ_t [ −Σ_s σ(s) log ψ̃_t(s_1:t) + log Σ_s p0(s) ψ̃_t(s_1:t) ]: a prefix's p0 mass is the sum over its completions.
    r = full_rollouts(target, exact, twist, "p0")
    lpsi = torch.where(r.learned, r.log_psi, r.log_phi.unsqueeze(-1).expand_as(r.log_psi))[0]  # (S, T)
    sigma, log_p0 = exact.probs, exact.log_p0
    objective = sum(-(sigma * lpsi[:, t]).sum() + torch.logsumexp(log_p0 + lpsi[:, t], 0) for t in range(T))
    exact_grad = table_grad(twist, objective)
    assert grad.abs().max() > 1e-3
    assert torch.allclose(grad, exact_grad, atol=1e-10)


def test_ctl_gradient_vanishes_at_optimum(target, exact):
    twist = optimal_table(target, exact)
    loss = LOSSES["ctl"].compute(
        full_rollouts(target, exact, twist, "p0"), full_rollouts(target, exact, twist, "sigma"), None
    )
    assert table_grad(twist, loss).abs().max() < 1e-10


def test_rl_loss_is_zero_at_optimum(target, exact):
    twist = optimal_table(target, exact)
    loss = LOSSES["rl"].compute(full_rollouts(target, exact, twist, "p0"), None, None)
    assert float(loss.detach()) < 1e-20
    off = optimal_table(target, exact, shift=0.3)
    assert float(LOSSES["rl"].compute(full_rollouts(target, exact, off, "p0"), None, None).detach()) > 1e-3


def test_sixo_gradient_vanishes_at_optimum_over_z(target, exact):
    """SIXO's optimum is ψ*/Z (one constant for every step, finishing steps included)."""
    twist = optimal_table(target, exact, shift=exact.log_z)
    loss = LOSSES["sixo"].compute(
        full_rollouts(target, exact, twist, "p0"), full_rollouts(target, exact, twist, "sigma"), None
    )
    assert table_grad(twist, loss).abs().max() < 1e-10
    twist = optimal_table(target, exact)  # ψ* itself is off by the factor Z
    loss = LOSSES["sixo"].compute(
        full_rollouts(target, exact, twist, "p0"), full_rollouts(target, exact, twist, "sigma"), None
    )
    assert table_grad(twist, loss).abs().max() > 1e-3


def test_fudge_gradient_vanishes_at_optimum(target, exact):
    """With expected labels y = φ(s) (the Bernoulli labels' mean) the BCE gradient is 0 at ψ* = E_p0[φ | s_1:t].

    Where ψ* = 1 (every completion has φ = 1) the optimum sits on the boundary of ψ ∈ (0, 1]: the gradient in log ψ
    is −weight there (a sigmoid head approaches it as its logit grows); those entries are left out.
    """
    twist = optimal_table(target, exact)
    r = full_rollouts(target, exact, twist, "p0")
    weight = torch.where(r.learned, safe_softmax(r.log_weight, 1).unsqueeze(-1), torch.zeros(()).double())
    loss = fudge_loss(r.log_psi, r.log_phi.exp(), weight)
    grad = table_grad(twist, loss)
    interior = twist.table.detach() < -1e-9
    assert interior.sum() > 100 and grad[interior].abs().max() < 1e-10


def q_rollouts(target, exact, twist) -> Rollouts:
    """Every sequence once as a twisted-proposal sample, data-weighted by q_θ itself (the exact q expectation)."""
    seqs = [list(s) for s in exact.sequences]
    feats = prefix_features(target.lm, target.prompt_ids, seqs, prompt_index=[0] * len(seqs), max_new_tokens=T)
    lq = make_rollouts(feats, prefix_log_psi(twist, feats), exact.log_phi, 1, proposal="twisted").log_q.sum(dim=2)
    return make_rollouts(feats, prefix_log_psi(twist, feats), exact.log_phi, 1, log_weight=lq, proposal="twisted",
                         differentiable_q=True)


def test_jeffreys_gradient_is_the_exact_kl_sum_gradient(target, exact):
    """Weighted by q_θ over every sequence, the Jeffreys surrogate's gradient is ∇[KL(σ‖q_θ) + KL(q_θ‖σ)], the KL
    sum computed here by enumeration from log q_θ(s) (itself checked against the per-step proposal)."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=5)
    r = q_rollouts(target, exact, twist)
    assert torch.allclose(r.log_q_seq.detach(), r.log_q.sum(dim=2), atol=1e-10)
    grad = table_grad(twist, LOSSES["jeffreys"].compute(r, None, None)).clone()

    log_q = q_rollouts(target, exact, twist).log_q_seq[0]
    sigma, log_sigma = exact.probs, exact.log_p0 + exact.log_phi - exact.log_z
    kl_sum = (sigma * (log_sigma - log_q)).sum() + (log_q.exp() * (log_q - log_sigma)).sum()
    exact_grad = table_grad(twist, kl_sum)
    assert grad.abs().max() > 1e-3
    assert torch.allclose(grad, exact_grad, atol=1e-10)


def test_jeffreys_gradient_vanishes_at_optimum(target, exact):
    twist = optimal_table(target, exact)
    assert table_grad(twist, LOSSES["jeffreys"].compute(q_rollouts(target, exact, twist), None, None)).abs().max() < 1e-10


def test_jeffreys_refuses_negatives_that_are_not_its_own(target, exact):
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=5)
    with pytest.raises(ConfigError, match="jeffreys loss needs negatives from the twisted proposal"):
        LOSSES["jeffreys"].compute(full_rollouts(target, exact, twist, "p0"), None, None)
    with pytest.raises(ConfigError, match="twisted proposal only"):
        seqs = [list(s) for s in exact.sequences]
        feats = prefix_features(target.lm, target.prompt_ids, seqs, prompt_index=[0] * len(seqs), max_new_tokens=T)
        make_rollouts(feats, prefix_log_psi(twist, feats), exact.log_phi, 1, differentiable_q=True)
    cfg = TwistTrainingConfig(output_dir="unused", loss="jeffreys", proposal="base", plot=False)
    with pytest.raises(ConfigError, match="learns from the twisted proposal's own samples"):
        TwistTrainer(twist, target, cfg)


# --------------------------------------------------------------------------------------- training from random init


def train(target, twist, loss, steps, lr, particles=64, positives="exact", seed=0, **kwargs):
    cfg = TwistTrainingConfig(
        output_dir="unused",
        loss=loss,
        learning_rate=lr,
        max_steps=steps,
        num_particles=particles,
        positives=positives,
        seed=seed,
        logging_steps=10**6,
        save_steps=0,
        plot=False,
        lr_scheduler_type="linear",
        **kwargs,
    )
    trainer = TwistTrainer(twist, target, cfg)
    for step in range(steps):  # the loop of TwistTrainer.train, without its final save_outputs
        trainer.training_step()
    return twist


@pytest.mark.parametrize("loss", ["ctl", "rl", "sixo", "fudge"])
def test_loss_drives_tabular_proposal_to_sigma(target, exact, loss):
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0, output=get_loss(loss).twist_output)
    before = exact_kl(target, twist, exact)
    train(target, twist, loss, steps=400, lr=0.2)
    after = exact_kl(target, twist, exact)
    print(f"{loss}: KL(σ‖q) {before:.3f} → {after:.4f}")
    assert after < KL_GOAL
    assert after < before / 20 and after < kl_sigma_p0(exact) / 20


def test_jeffreys_drives_tabular_proposal_to_sigma_on_its_own_samples(target, exact):
    """On-policy only (no positives): the forward term is self-normalised over q_θ's draws, noisier than exact
    positives, so more draws and a smaller step than the other losses (at K = 64, lr 0.2 it stalls near 0.6 nats;
    exact expectations reach 1e-7 in 400 steps)."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    before = exact_kl(target, twist, exact)
    train(target, twist, "jeffreys", steps=400, lr=0.1, particles=256)
    after = exact_kl(target, twist, exact)
    print(f"jeffreys: KL(σ‖q) {before:.3f} → {after:.4f}")
    assert after < 2 * KL_GOAL and after < before / 20 and after < kl_sigma_p0(exact) / 20


def test_ctl_drives_mlp_proposal_to_sigma(target, exact, lm):
    """An MLP head over the toy LM's 8-dim hidden state reaches the goal too (it must separate all 85 prefixes)."""
    twist = MLPTwist.for_lm(lm, width=256, depth=2, seed=0, dtype="float64")
    before = exact_kl(target, twist, exact)  # zero last layer: ψ ≡ 1, q = p0
    train(target, twist, "ctl", steps=500, lr=0.01)
    after = exact_kl(target, twist, exact)
    print(f"ctl/mlp: KL(σ‖q) {before:.3f} → {after:.4f}")
    assert after < KL_GOAL and after < before / 20


def test_ctl_drives_embedding_head_proposal_to_sigma(target, exact, lm):
    """The embedding-factorised head (MLP features scored against the LM's token embeddings, plus per-token bias)."""
    twist = EmbeddingTwist.for_lm(lm, width=256, depth=2, seed=0, dtype="float64")
    before = exact_kl(target, twist, exact)
    train(target, twist, "ctl", steps=400, lr=0.01)
    after = exact_kl(target, twist, exact)
    print(f"ctl/embedding: KL(σ‖q) {before:.3f} → {after:.4f}")
    assert after < KL_GOAL and after < before / 20


def test_ctl_with_rejection_positives(target, exact):
    """Rejection sampling gives exact positives without enumeration (0 ≤ φ ≤ 1)."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    train(target, twist, "ctl", steps=300, lr=0.2, positives="rejection")
    assert exact_kl(target, twist, exact) < KL_GOAL


def test_ctl_with_smc_positives_improves(target, exact):
    """Approximate positives (twisted SMC particles with normalised weights) carry an O(1/K) bias, but still learn."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    before = exact_kl(target, twist, exact)
    train(target, twist, "ctl", steps=200, lr=0.2, positives="smc", num_positives=256)
    assert exact_kl(target, twist, exact) < before / 5


def test_ctl_with_replay_buffer_positives(target, exact):
    """Buffer positives (every past negative, replayed ∝ its importance weight p0 φ / q): a consistent approximation
    of σ from the last draws (default capacity 1024), so CTL reaches the goal with no extra sampling for positives."""
    twist = TabularTwist.for_target(target, init_scale=1.0, seed=0)
    before = exact_kl(target, twist, exact)
    train(target, twist, "ctl", steps=400, lr=0.2, positives="buffer")
    after = exact_kl(target, twist, exact)
    print(f"ctl/buffer: KL(σ‖q) {before:.3f} → {after:.4f}")
    assert after < KL_GOAL and after < before / 20


# ---------------------------------------------------------------------------------------------- shapes and errors


def test_registry():
    assert set(LOSSES) == {"ctl", "rl", "sixo", "fudge", "jeffreys"}
    assert get_loss("fudge").bounded_only and get_loss("fudge").twist_output == "sigmoid"
    assert get_loss("ctl").needs_positives and get_loss("sixo").needs_positives and not get_loss("rl").needs_positives
    with pytest.raises(ConfigError, match="unknown twist loss 'kl'.*ctl, fudge, jeffreys, rl, sixo"):
        get_loss("kl")


def _x(*shape):
    return torch.zeros(*shape, dtype=torch.float64, requires_grad=True)


def test_ctl_shapes():
    ok = ctl_loss(_x(2, 3, 4), torch.ones(2, 3, 4), _x(2, 5, 4), torch.zeros(2, 5, 4), torch.ones(2, 5, 4, dtype=bool))
    assert ok.shape == ()
    with pytest.raises(ConfigError, match=r"pos_log_psi must have shape \(B,P,T\)"):
        ctl_loss(_x(3, 4), torch.ones(3, 4), _x(2, 5, 4), torch.zeros(2, 5, 4), torch.ones(2, 5, 4, dtype=bool))
    with pytest.raises(ConfigError, match="T = 3"):
        ctl_loss(_x(2, 3, 4), torch.ones(2, 3, 4), _x(2, 5, 3), torch.zeros(2, 5, 3), torch.ones(2, 5, 3, dtype=bool))
    with pytest.raises(ConfigError, match="P = 2"):
        ctl_loss(_x(2, 3, 4), torch.ones(2, 2, 4), _x(2, 5, 4), torch.zeros(2, 5, 4), torch.ones(2, 5, 4, dtype=bool))


def test_rl_shapes():
    assert rl_loss(_x(1, 3, 4), torch.zeros(1, 3, 4), torch.ones(1, 3, 4)).shape == ()
    with pytest.raises(ConfigError, match="target"):
        rl_loss(_x(1, 3, 4), torch.zeros(1, 3, 5), torch.ones(1, 3, 4))


def test_sixo_shapes():
    assert sixo_loss(_x(1, 3, 4), torch.ones(1, 3, 4), _x(1, 6, 4), torch.ones(1, 6, 4)).shape == ()
    with pytest.raises(ConfigError, match="neg_weight"):
        sixo_loss(_x(1, 3, 4), torch.ones(1, 3, 4), _x(1, 6, 4), torch.ones(1, 5, 4))


def test_jeffreys_shapes_and_padding():
    """Padding rows (data weight −∞) get no weight even where their log w is garbage."""
    log_q = _x(2, 3)
    log_weight = torch.tensor([[0.0, 0.0, -math.inf], [0.0, 0.0, 0.0]], dtype=torch.float64)
    log_w = torch.tensor([[-1.0, -2.0, math.nan], [-1.0, -2.0, -3.0]], dtype=torch.float64)
    loss = jeffreys_loss(log_q, log_w, log_weight)
    loss.backward()
    assert torch.isfinite(loss) and log_q.grad[0, 2] == 0 and log_q.grad[0, :2].abs().sum() > 0
    with pytest.raises(ConfigError, match=r"log_w must have shape \(B,K\)"):
        jeffreys_loss(_x(2, 3), torch.zeros(3), torch.zeros(2, 3))


def test_fudge_shapes_and_ranges():
    assert fudge_loss(_x(1, 3, 4) - 1, torch.ones(1, 3), torch.ones(1, 3, 4)).shape == ()
    with pytest.raises(ConfigError, match="labels"):
        fudge_loss(_x(1, 3, 4) - 1, torch.ones(1, 4), torch.ones(1, 3, 4))
    with pytest.raises(ConfigError, match="output='sigmoid'"):
        fudge_loss(_x(1, 3, 4) + 0.5, torch.ones(1, 3), torch.ones(1, 3, 4))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        fudge_loss(_x(1, 3, 4) - 1, torch.full((1, 3), 2.0), torch.ones(1, 3, 4))
    with pytest.raises(ConfigError, match="0 ≤ φ ≤ 1"):
        fudge_labels(torch.tensor([0.0, 0.7], dtype=torch.float64), torch.Generator())


def test_losses_ignore_masked_entries():
    """Entries with weight 0 may hold anything (±inf, NaN): neither the value nor the gradient sees them."""
    lp = torch.tensor([[[-1.0, float("nan")], [-2.0, float("-inf")]]], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    for loss in (rl_loss(lp, torch.zeros_like(w), w), sixo_loss(lp, w, lp, w), fudge_loss(lp, torch.ones(1, 2), w)):
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        lp.grad = None


def test_fudge_refuses_unbounded_potential(lm):
    target = Target(lm, prompt="a", potential=Unbounded(), max_new_tokens=3)
    twist = TabularTwist.for_target(target, output="sigmoid")
    with pytest.raises(ConfigError, match="fudge loss needs a potential with 0 ≤ φ ≤ 1"):
        TwistTrainer(twist, target, TwistTrainingConfig(loss="fudge", save_steps=0))


def test_fudge_refuses_log_output_twist(target):
    with pytest.raises(ConfigError, match="output='sigmoid'"):
        TwistTrainer(TabularTwist.for_target(target), target, TwistTrainingConfig(loss="fudge", save_steps=0))
