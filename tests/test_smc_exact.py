"""Exactness of the samplers on the toy LM, whose sequences are enumerated (MATH.md, "SMC and the evidence estimate").

Many independent runs are one batched call: a target with R copies of the prompt is R independent groups.
"""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm.errors import ConfigError, PotentialError
from twistlm.exact import OptimalTwist, enumerate_target

RUNS = 2000
NEG_INF = float("-inf")
SE_TOLERANCE = 4.0
RESAMPLERS = sorted(twistlm.RESAMPLERS)


def hard_potential(texts: list[str]) -> list[float]:
    """φ = 1 if the text contains 'b', e^{-1} if it contains 'a' but no 'b', else 0 (−∞ on a set of sequences)."""
    return [0.0 if "b" in t else (-1.0 if "a" in t else NEG_INF) for t in texts]


def soft_potential(texts: list[str]) -> list[float]:
    """A strictly positive φ, so log Ẑ is finite on every run."""
    return [-1.5 * t.count("c") + 0.5 * t.count("a") for t in texts]


def make_target(lm, potential, runs=1, prompt="a", T=4):
    return twistlm.Target(lm, prompts=[prompt] * runs, potential=potential, max_new_tokens=T)


def log_zs(results) -> torch.Tensor:
    return torch.tensor([r.log_z for r in results], dtype=torch.float64)


def assert_unbiased(results, log_z: float):
    z_hat = log_zs(results).exp()
    mean, se = float(z_hat.mean()), float(z_hat.std() / math.sqrt(len(z_hat)))
    z = math.exp(log_z)
    assert abs(mean - z) <= SE_TOLERANCE * se, f"mean Ẑ {mean:.5f} vs Z {z:.5f} (se {se:.5f})"


def random_twist(lm, seed=3):
    return twistlm.LinearTwist.for_lm(lm, init_scale=0.7, seed=seed).double()


SAMPLERS = {
    "smc_base": lambda lm: {"proposal": "base"},
    "smc_twisted": lambda lm: {"proposal": "twisted", "twist": random_twist(lm)},
    "smc_base_with_twist_targets": lambda lm: {"proposal": "base", "twist": random_twist(lm)},
}


def test_sis_is_unbiased(toy):
    exact = enumerate_target(make_target(toy, hard_potential))
    results = twistlm.run_smc(make_target(toy, hard_potential, RUNS), 4, ess_threshold=0.0, seed=11)
    assert all(r.resampled_at == [] for r in results)
    assert_unbiased(results, exact.log_z)


@pytest.mark.parametrize("resampler", RESAMPLERS)
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_smc_is_unbiased_for_every_sampler_and_resampler(toy, sampler, resampler):
    exact = enumerate_target(make_target(toy, hard_potential))
    kwargs = SAMPLERS[sampler](toy)
    results = twistlm.run_smc(
        make_target(toy, hard_potential, RUNS), 4, resampler=resampler, ess_threshold=1.0, seed=7, **kwargs
    )
    assert any(r.resampled_at for r in results)
    assert_unbiased(results, exact.log_z)


def test_adaptive_resampling_is_unbiased(toy):
    exact = enumerate_target(make_target(toy, hard_potential))
    results = twistlm.run_smc(
        make_target(toy, hard_potential, RUNS), 4, proposal="twisted", twist=random_twist(toy), ess_threshold=0.5
    )
    n_events = [len(r.resampled_at) for r in results]
    assert 0 < sum(n_events) < len(results) * 3, "κ = 0.5 should resample sometimes, not always"
    assert_unbiased(results, exact.log_z)


@pytest.mark.parametrize("sampler", ["sis", "smc_twisted"])
def test_log_z_is_a_lower_bound_whose_gap_shrinks_with_k(toy, sampler):
    exact = enumerate_target(make_target(toy, soft_potential))
    kwargs = {"ess_threshold": 0.0} if sampler == "sis" else {"proposal": "twisted", "twist": random_twist(toy)}
    means, ses = [], []
    for k in (1, 4, 16):
        lz = log_zs(twistlm.run_smc(make_target(toy, soft_potential, 1000), k, seed=k, **kwargs))
        means.append(float(lz.mean()))
        ses.append(float(lz.std() / math.sqrt(len(lz))))
    for m, se in zip(means, ses):
        assert m <= exact.log_z + 3 * se
    gaps = [exact.log_z - m for m in means]
    assert gaps[0] > gaps[1] > gaps[2] >= -3 * ses[2], gaps
    assert gaps[0] > 0.05, "the K = 1 gap (= KL(q‖σ)) should be visible on this target"


@pytest.mark.parametrize("resampler", RESAMPLERS)
def test_weighted_particles_approach_sigma(toy, resampler):
    """TV(σ, weighted particles) < 0.06 at K = 20,000 (sequences of T ≤ 3 over 4 letters + EOS: 85 of them)."""
    target = make_target(toy, hard_potential, T=3)
    exact = enumerate_target(target)
    tvs = []
    for k in (200, 20000):
        res = twistlm.smc(target, k, resampler=resampler, seed=1)
        tvs.append(exact.total_variation(res.token_ids, res.normalized_weights))
    assert tvs[1] < 0.06, tvs
    assert tvs[1] < tvs[0]


@pytest.mark.parametrize("resampler", RESAMPLERS)
@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_optimal_twist_gives_exact_z_on_every_run(toy, resampler, kappa):
    target = make_target(toy, hard_potential)
    exact = enumerate_target(target)
    opt = OptimalTwist(exact, toy.vocab_size)
    results = twistlm.run_smc(
        make_target(toy, hard_potential, 300), 4, proposal="twisted", twist=opt, resampler=resampler,
        ess_threshold=kappa, seed=2,
    )
    assert torch.allclose(log_zs(results), torch.full((300,), exact.log_z, dtype=torch.float64), atol=1e-10)
    for r in results:
        assert torch.allclose(r.log_weights, r.log_weights[0].expand_as(r.log_weights), atol=1e-10)


def test_optimal_twist_samples_exactly_sigma(toy):
    target = make_target(toy, hard_potential, T=3)
    exact = enumerate_target(target)
    opt = OptimalTwist(exact, toy.vocab_size)
    res = twistlm.smc(target, 20000, proposal="twisted", twist=opt, ess_threshold=0.0, seed=4)
    uniform = torch.full((20000,), 1 / 20000, dtype=torch.float64)
    assert torch.allclose(res.normalized_weights, uniform)
    # 20,000 i.i.d. draws over ≤ 85 sequences: TV from sampling noise alone is about 0.02.
    assert exact.total_variation(res.token_ids, uniform) < 0.04
    assert all(torch.isfinite(res.log_phi))


def test_same_seed_same_output_and_different_seed_differs(toy):
    target = make_target(toy, hard_potential, runs=3)
    a = twistlm.run_smc(target, 8, seed=5)
    b = twistlm.run_smc(target, 8, seed=5)
    c = twistlm.run_smc(target, 8, seed=6)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(torch.equal(x.log_weights, y.log_weights) for x, y in zip(a, b))
    assert [r.token_ids for r in a] != [r.token_ids for r in c]


def test_per_particle_eos():
    lm = twistlm.ToyLM(vocab_size=5, seed=1, eos_bias=0.5)
    res = twistlm.sis(make_target(lm, None, T=6), 64, seed=0)
    eos = lm.eos_token_id
    assert any(res.finished_by_eos) and not all(res.finished_by_eos)
    for ids, text, stopped in zip(res.token_ids, res.texts, res.finished_by_eos):
        assert (ids[-1] == eos) == stopped
        assert eos not in ids[:-1]
        assert len(text) == len(ids) - (1 if stopped else 0)
        assert stopped or len(ids) == 6
    assert res.log_z == pytest.approx(0.0)  # φ ≡ 1: every weight is exactly 1


def test_several_prompts_in_one_batch_each_unbiased(toy):
    prompts = ["a", "bd"] * RUNS
    target = twistlm.Target(toy, prompts=prompts, potential=hard_potential, max_new_tokens=4)
    results = twistlm.run_smc(target, 4, resampler="systematic", seed=3)
    for p in ("a", "bd"):
        exact = enumerate_target(twistlm.Target(toy, prompt=p, potential=hard_potential, max_new_tokens=4))
        assert_unbiased([r for r in results if r.prompt == p], exact.log_z)


def test_ancestry_and_lineage(toy):
    res = twistlm.smc(make_target(toy, soft_potential), 16, proposal="twisted", twist=random_twist(toy), seed=1)
    assert res.resampled_at == sorted(res.resampled_at) and len(res.ancestors) == len(res.resampled_at)
    assert all(a.shape == (16,) and int(a.max()) < 16 for a in res.ancestors)
    origin = res.lineage()
    assert len(origin) == 16 and all(0 <= o < 16 for o in origin)
    assert len(res.ess) >= 1 and all(0 < e <= 16 + 1e-9 for e in res.ess)
    assert res.normalized_weights.sum() == pytest.approx(1.0)
    never = twistlm.sis(make_target(toy, soft_potential), 16, seed=1)
    assert never.resampled_at == [] and never.lineage() == list(range(16))


def test_all_particles_dead_gives_minus_infinity_not_nan(toy):
    results = twistlm.run_smc(make_target(toy, lambda texts: [NEG_INF] * len(texts), runs=3), 4, seed=0)
    for r in results:
        assert math.isinf(r.log_z) and r.log_z < 0
        assert not torch.isnan(r.log_weights).any()
        assert float(r.normalized_weights.sum()) == 0.0


def test_nan_from_a_potential_names_it(toy):
    def broken(texts):
        return [float("nan")] * len(texts)

    with pytest.raises(PotentialError, match="broken.*NaN"):
        twistlm.smc(make_target(toy, broken), 4)


def test_conditional_smc_keeps_the_reference(toy):
    target = make_target(toy, hard_potential, runs=2)
    eos = toy.eos_token_id
    reference = [[1, 2, eos], [0, 1, 1, 3]]
    results = twistlm.run_smc(target, 8, reference=reference, resampler="systematic", seed=0)
    for r, ref in zip(results, reference):
        assert r.token_ids[0] == ref
        assert all(int(a[0]) == 0 for a in r.ancestors)
    with pytest.raises(ConfigError, match="not a finished sequence"):
        twistlm.run_smc(target, 4, reference=[[1, 2], [0]])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"proposal": "magic"}, "unknown proposal"),
        ({"proposal": "twisted"}, "needs a twist"),
        ({"resampler": "bogus"}, "unknown resampler"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
    ],
)
def test_bad_arguments_are_clear_errors(toy, kwargs, message):
    kwargs = {"num_particles": 4, **kwargs}
    with pytest.raises(ConfigError, match=message):
        twistlm.smc(make_target(toy, None), **kwargs)


def test_one_particle_smc_equals_sis_and_accepts_a_reference(toy):
    target = make_target(toy, soft_potential, runs=3)
    a = twistlm.run_smc(target, 1, ess_threshold=1.0, seed=3)
    b = twistlm.run_smc(target, 1, ess_threshold=0.0, seed=3)
    assert [r.log_z for r in a] == pytest.approx([r.log_z for r in b])
    ref = [[1, toy.eos_token_id]] * 3
    c = twistlm.run_smc(target, 1, reference=ref, ess_threshold=1.0)
    assert all(r.token_ids[0] == ref[0] for r in c)
