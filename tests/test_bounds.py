"""Exactness of the evaluation machinery on the toy LM, against enumeration (MATH.md, "Bounds on log Z", "KL
estimates", "Exact target samples").

Statistical checks use fixed seeds; margins are stated where they are used (3 standard errors for means, a
chi-square statistic below df + 5·√(2·df), far in the tail of χ²_df, for distributions).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from twistlm import LinearTwist, OptimalTwist, Target, ToyLM, enumerate_target
from twistlm.bdmc import ExactSpanPotential, bdmc_pairs, infilling_problem
from twistlm.bounds import Estimate, log_z_bounds, t_quantile_975
from twistlm.errors import ConfigError, TwistLMError
from twistlm.kl import kl_estimates, kl_from_bounds
from twistlm.potentials import FunctionPotential, Potential, Sequences
from twistlm.rejection import rejection_sample
from twistlm.report import exact_log_z
from twistlm.twists.base import TwistContext

KS = [1, 2, 4, 8, 16]
RUNS = 800
T = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def hard(texts):
    """Bounded φ with a hard constraint: 0 on completions containing "bb" (about 19% of p0's mass)."""
    return [-math.inf if "bb" in t else -0.8 * t.count("a") - 0.3 * len(t) for t in texts]


def soft(texts):
    """Bounded φ, strictly positive, far from constant."""
    return [-1.5 * t.count("a") - 0.7 * t.count("c") + (-1.0 if len(t) < 2 else 0.0) for t in texts]


@pytest.fixture(scope="module")
def lm():
    return ToyLM(vocab_size=5, hidden_size=8, seed=1)


@pytest.fixture(scope="module")
def twist(lm):
    return LinearTwist.for_lm(lm, init_scale=0.5, seed=3).double()


def make_target(lm, fn, bounded=True):
    return Target(lm, prompt="ab", potential=FunctionPotential(fn, name=fn.__name__, bounded=bounded), max_new_tokens=T)


def sigma_samples(exact, n, seed):
    idx = torch.multinomial(exact.probs, n, replacement=True, generator=torch.Generator().manual_seed(seed))
    return [list(exact.sequences[i]) for i in idx.tolist()]


def chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic over bins with expected count ≥ 5 (the rest pooled into one bin), and its df."""
    stat, pooled_obs, pooled_exp, bins = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        expected = n * p
        if expected >= 5:
            stat += (counts.get(key, 0) - expected) ** 2 / expected
            bins += 1
        else:
            pooled_obs += counts.get(key, 0)
            pooled_exp += expected
    extra = sum(c for k, c in counts.items() if k not in probs)
    pooled_obs += extra
    if pooled_exp >= 5:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        bins += 1
    else:
        assert pooled_obs <= 5 + 5 * max(pooled_exp, 1.0), "mass where σ has (almost) none"
    return stat, bins - 1


def assert_chi_square_ok(counts, probs, n):
    stat, df = chi_square(counts, probs, n)
    assert df >= 3
    assert stat < df + 5 * math.sqrt(2 * df), (stat, df)


def check_sandwich(bounds, log_z, name):
    gaps = []
    for K in KS:
        e = bounds.entry(name, K)
        lo, up = e.lower, e.upper
        assert lo.mean <= log_z + 3 * lo.stderr + 1e-9, (name, K, lo)
        assert math.isfinite(up.mean), (name, K, up)  # the clamped exact sample always has positive weight
        assert up.mean + 3 * up.stderr >= log_z - 1e-9, (name, K, up)
        gaps.append((up.mean - lo.mean, math.hypot(lo.stderr, up.stderr)))
    assert gaps[-1][0] < gaps[0][0]
    for (g1, s1), (g2, s2) in itertools.pairwise(gaps):
        if math.isfinite(g1):
            assert g2 <= g1 + 3 * math.hypot(s1, s2), gaps
    return gaps


# ----- bounds -----

CONFIGS = [
    ("sis", "systematic", 0.0, True),
    ("smc", "systematic", 1.0, True),
    ("smc", "multinomial", 1.0, False),
    ("smc", "stratified", 0.5, False),
    ("smc", "residual", 1.0, False),
]


@pytest.mark.parametrize("sampler,resampler,kappa,with_twist", CONFIGS)
def test_bounds_sandwich_log_z_with_hard_constraint(lm, twist, sampler, resampler, kappa, with_twist):
    target = make_target(lm, hard)
    exact = enumerate_target(target)
    proposals = {"base": "base", "twist": ("twisted", twist)} if with_twist else {"base": "base"}
    bounds = log_z_bounds(
        target, proposals, KS, RUNS, sigma_samples(exact, RUNS, 1), sampler=sampler, resampler=resampler,
        ess_threshold=kappa, seed=7,
    )  # fmt: skip
    for name in proposals:
        check_sandwich(bounds, exact.log_z, name)
    # With φ = 0 on ~19% of p0's mass, some K = 1 runs have Ẑ = 0: the lower bound is −∞ (valid, uninformative).
    k1 = bounds.entry("base", 1).lower
    assert k1.mean == -math.inf and k1.num_infinite > 0
    assert math.isfinite(bounds.entry("base", 16).lower.mean)
    lower, upper = bounds.tightest()
    assert lower <= exact.log_z <= upper + 0.05


def test_pooled_estimates_lie_inside_the_mean_bounds_and_locate_log_z_from_k_1_runs(lm, twist):
    """With K = 1 runs only, the midpoint of the mean bounds is the ELBO/EUBO midpoint (a KL sum split in halves);
    the pooled pair (log mean Ẑ, −log mean 1/Ẑ⁺ over the runs) lies inside it and brackets log Z closely."""
    target = make_target(lm, soft)
    exact = enumerate_target(target)
    bounds = log_z_bounds(target, {"base": "base", "twist": twist}, [1], RUNS, sigma_samples(exact, RUNS, 4), seed=5)
    lower, upper = bounds.tightest()
    pooled_lower, pooled_upper = bounds.pooled()
    assert lower <= pooled_lower and pooled_upper <= upper
    assert upper - lower > 0.3  # the mean K = 1 bounds are loose here
    assert abs(bounds.best_log_z() - exact.log_z) < 0.05
    assert bounds.to_dict()["pooled_lower"] == pooled_lower


@pytest.mark.parametrize("sampler", ["sis", "smc"])
def test_bounds_finite_and_tightening_with_soft_potential(lm, twist, sampler):
    target = make_target(lm, soft)
    exact = enumerate_target(target)
    proposals = {"base": "base", "twist": twist}
    bounds = log_z_bounds(target, proposals, KS, RUNS, sigma_samples(exact, RUNS, 2), sampler=sampler, seed=3)
    for name in proposals:
        gaps = check_sandwich(bounds, exact.log_z, name)
        assert all(math.isfinite(g) for g, _ in gaps)
        assert gaps[-1][0] < 0.5 * gaps[0][0]
    assert abs(bounds.best_log_z() - exact.log_z) < 0.1
    assert bounds.to_dict()["entries"][0]["lower"]["n"] == RUNS


@pytest.mark.parametrize("sampler", ["sis", "smc"])
def test_optimal_twist_bounds_equal_log_z(lm, sampler):
    target = make_target(lm, hard)
    exact = enumerate_target(target)
    opt = OptimalTwist(exact, lm.vocab_size)
    bounds = log_z_bounds(target, {"opt": opt}, KS, 6, sigma_samples(exact, 6, 4), sampler=sampler, seed=1)
    for K in KS:
        e = bounds.entry("opt", K)
        assert torch.allclose(e.lower_values, torch.full((6,), exact.log_z, dtype=torch.float64), atol=1e-9)
        assert torch.allclose(e.upper_values, torch.full((6,), exact.log_z, dtype=torch.float64), atol=1e-9)


def test_fewer_exact_samples_than_runs_and_bad_inputs(lm):
    target = make_target(lm, soft)
    exact = enumerate_target(target)
    bounds = log_z_bounds(target, {"base": "base"}, [1, 2], 20, sigma_samples(exact, 5, 0))
    assert bounds.num_exact == 5 and bounds.entry("base", 2).upper.n == 5 and bounds.entry("base", 2).lower.n == 20
    with pytest.raises(ConfigError, match="sampler"):
        log_z_bounds(target, {"base": "base"}, [1], 4, sampler="pmcmc")
    with pytest.raises(ConfigError, match="particle counts"):
        log_z_bounds(target, {"base": "base"}, [0], 4)
    with pytest.raises(ConfigError, match="twist"):
        log_z_bounds(target, {"t": "twisted"}, [1], 4)


def test_estimate_and_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(30) == 2.042
    assert abs(t_quantile_975(40) - 2.021) < 1e-3 and abs(t_quantile_975(10_000) - 1.960) < 1e-3
    e = Estimate.from_values([1.0, 2.0, 3.0, 4.0])
    assert e.mean == 2.5 and abs(e.stderr - math.sqrt(5 / 3) / 2) < 1e-12
    assert abs(e.ci_high - e.mean - 3.182 * e.stderr) < 1e-12
    inf = Estimate.from_values([0.0, -math.inf])
    assert inf.mean == -math.inf and inf.num_infinite == 1


# ----- KL -----


@torch.inference_mode()
def exact_log_q(lm, target, exact, twist):
    """log q(s) of every enumerated sequence, by walking the toy LM with the (twist-induced) proposal."""
    seqs = exact.sequences
    n, stops = len(seqs), set(target.stop_ids)
    state = lm.prefill(target.prompt_ids, n)
    tokens = torch.full((n, T), lm.eos_token_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    log_q = torch.zeros(n, dtype=torch.float64)
    for t in range(T):
        logits = state.logprobs.to(torch.float64)
        if twist is not None:
            ctx = TwistContext(state.hidden, tokens[:, :t], t + 1, T, torch.zeros(n, dtype=torch.long))
            logits = logits + twist.log_psi(ctx).to(torch.float64)
        lq = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, t : t + 1]).squeeze(1)
        active = torch.tensor([len(s) > t for s in seqs])
        log_q += torch.where(active, lq, torch.zeros_like(lq))
        state = lm.step(state, tokens[:, t])
    assert all(s[-1] in stops or len(s) == T for s in seqs)
    return log_q


@pytest.mark.parametrize("use_twist", [False, True])
def test_kl_estimates_match_enumeration(lm, twist, use_twist):
    target = make_target(lm, soft)
    exact = enumerate_target(target)
    tw = twist if use_twist else None
    log_q = exact_log_q(lm, target, exact, tw)
    q = torch.exp(log_q)
    assert abs(float(q.sum()) - 1.0) < 1e-9
    log_sigma = torch.log(exact.probs)
    kl_qs = float((q * (log_q - log_sigma)).sum())
    kl_sq = float((exact.probs * (log_sigma - log_q)).sum())
    n = 3000
    prop = ("twisted", tw) if use_twist else "base"
    est = kl_estimates(target, {"q": prop}, n, sigma_samples(exact, n, 5), log_z=exact.log_z, seed=11)["q"]
    assert est.log_z_source == "exact"
    assert abs(est.kl_q_sigma.mean - kl_qs) <= 3 * est.kl_q_sigma.stderr, (est.kl_q_sigma, kl_qs)
    assert abs(est.kl_sigma_q.mean - kl_sq) <= 3 * est.kl_sigma_q.stderr, (est.kl_sigma_q, kl_sq)
    assert abs(est.kl_sum.mean - (kl_qs + kl_sq)) <= 3 * est.kl_sum.stderr
    assert est.kl_q_sigma.ci_low < kl_qs < est.kl_q_sigma.ci_high or abs(est.kl_q_sigma.mean - kl_qs) < 0.05


def test_kl_from_bounds_and_hard_constraint(lm, twist):
    target = make_target(lm, hard)
    exact = enumerate_target(target)
    bounds = log_z_bounds(target, {"base": "base", "twist": twist}, [1, 8], 300, sigma_samples(exact, 300, 6))
    kl = kl_from_bounds(bounds)
    assert kl["base"].log_z_source == "bounds" and kl["base"].log_z_best == bounds.best_log_z()
    # q = p0 reaches sequences with φ = 0, so KL(q‖σ) = ∞ (and is estimated as such); KL(σ‖q) stays finite.
    assert kl["base"].kl_q_sigma.mean == math.inf
    assert math.isfinite(kl["base"].kl_sigma_q.mean) and kl["base"].kl_sigma_q.mean > 0
    with pytest.raises(ConfigError, match="K = 1"):
        kl_from_bounds(log_z_bounds(target, {"base": "base"}, [2], 4))


# ----- rejection -----


def test_rejection_samples_match_sigma_and_estimate_z(lm):
    target = make_target(lm, hard)
    exact = enumerate_target(target)
    n = 3000
    res = rejection_sample(target, n, seed=5, batch_size=2048)
    assert res.complete and res.num_accepted == n == len(res.token_ids) == len(res.texts)
    assert all(not math.isinf(lp) for lp in res.log_phi)
    assert_chi_square_ok(Counter(tuple(s) for s in res.token_ids), exact.distribution(), n)
    z = math.exp(exact.log_z)
    assert res.z_ci[0] <= z <= res.z_ci[1]
    assert abs(res.z_hat - z) <= 3 * math.sqrt(z * (1 - z) / res.num_proposed) * 1.1
    again = rejection_sample(target, 50, seed=5)
    assert again.token_ids == rejection_sample(target, 50, seed=5).token_ids  # seeded


def test_rejection_budget_cap_and_unbounded(lm):
    rare = make_target(lm, lambda texts: [-12.0] * len(texts))
    with pytest.raises(TwistLMError, match=r"too rare.*0 of 10 requested.*2000 proposals.*acceptance rate 0"):
        rejection_sample(rare, 10, max_proposals=2000, batch_size=512)
    part = rejection_sample(rare, 10, max_proposals=2000, batch_size=512, allow_partial=True)
    assert not part.complete and part.num_proposed == 2000 and part.acceptance_rate == 0.0 and part.z_ci[0] == 0.0
    with pytest.raises(ConfigError, match="bounded"):
        rejection_sample(make_target(lm, soft, bounded=False), 10)


# ----- BDMC -----


class ToyLikelihood(Potential):
    """φ(s) = p0(o | x, s) through the ParticleLM interface; o fixed, or per prompt from extras["observation"]."""

    bounded = True
    name = "toy-likelihood"

    def __init__(self, lm, observation=None):
        self.lm = lm
        self.observation = observation

    def log_phi(self, seqs: Sequences):
        out = []
        for i, (prompt, ids) in enumerate(zip(seqs.prompts, seqs.token_ids)):
            o = self.observation if self.observation is not None else seqs.extras["observation"][i]
            state = self.lm.prefill([self.lm.encode(prompt) + list(ids)], 1)
            total = 0.0
            for tok in o:
                total += float(state.logprobs[0, tok])
                state = self.lm.step(state, torch.tensor([tok]))
            out.append(total)
        return out


def test_bdmc_pairs_are_exact_posterior_samples(lm):
    span, c = 2, 2
    base = Target(lm, prompt="ab", max_new_tokens=span)
    res = bdmc_pairs(base, 12000, c, seed=3, batch_size=4096)
    assert len(res.pairs) == 12000 and res.num_drawn == 12000 + res.num_redrawn > 12000
    eos = lm.eos_token_id
    assert all(len(p.span_ids) == span and eos not in p.span_ids + p.ending_ids for p in res.pairs)
    o, _ = Counter(tuple(p.ending_ids) for p in res.pairs).most_common(1)[0]
    spans = [tuple(p.span_ids) for p in res.pairs if tuple(p.ending_ids) == o]
    posterior = Target(
        lm, prompt="ab", max_new_tokens=span,
        potential=ExactSpanPotential(ToyLikelihood(lm, list(o)), span, base.stop_ids),
    )  # fmt: skip
    exact = enumerate_target(posterior)
    probs = exact.distribution()
    assert all(len(s) == span and eos not in s for s, p in probs.items() if p > 0)
    assert_chi_square_ok(Counter(spans), probs, len(spans))


def test_infilling_problem_bounds_sandwich_mean_log_z(lm):
    base = Target(lm, prompt="ab", potential=ToyLikelihood(lm), max_new_tokens=2)
    runs, samples, res = infilling_problem(base, 300, 2, seed=4)
    assert runs.num_prompts == 300 == len(samples) and runs.extras["observation"][0] == res.pairs[0].ending_ids
    mean_log_z = exact_log_z(runs)
    bounds = log_z_bounds(runs, {"base": "base"}, [1, 4], None, samples, sampler="sis", seed=2)
    for K in (1, 4):
        e = bounds.entry("base", K)
        assert e.lower.mean <= mean_log_z + 3 * e.lower.stderr
        assert e.upper.mean >= mean_log_z - 3 * e.upper.stderr
    with pytest.raises(ConfigError, match="fixed observation"):
        infilling_problem(Target(lm, prompt="ab", potential=ToyLikelihood(lm, [0]), max_new_tokens=2), 4, 2)


def test_bdmc_gives_up_when_early_stops_dominate():
    chatty = ToyLM(vocab_size=5, hidden_size=8, seed=1, eos_bias=8.0)
    with pytest.raises(TwistLMError, match="early stop"):
        bdmc_pairs(Target(chatty, prompt="ab", max_new_tokens=4), 100, 2, max_draws=200, batch_size=100)
