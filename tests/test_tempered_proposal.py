"""The tempered proposal q_t ∝ (p0 ψ_t)^{1/τ}: its draws follow q, its weights are exact, Ẑ is unbiased for Z.

Exactness on the toy LM, whose sequences are enumerated (as in test_smc_exact.py); many independent runs are one
batched call (a target with R copies of the prompt is R independent groups).
"""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm.errors import ConfigError
from twistlm.exact import enumerate_target
from twistlm.tools import Tool

RUNS = 2000
SE_TOLERANCE = 4.0
NEG_INF = float("-inf")
TEMPERATURES = (0.5, 2.0)


def hard_potential(texts: list[str]) -> list[float]:
    """φ = 1 if the text contains 'b', e^{-1} if it contains 'a' but no 'b', else 0."""
    return [0.0 if "b" in t else (-1.0 if "a" in t else NEG_INF) for t in texts]


def make_target(lm, runs=1, prompt="a", T=4, potential=hard_potential, tool=None):
    return twistlm.Target(lm, prompts=[prompt] * runs, potential=potential, max_new_tokens=T, tool=tool)


def assert_unbiased(results, log_z: float):
    z_hat = torch.tensor([r.log_z for r in results], dtype=torch.float64).exp()
    mean, se = float(z_hat.mean()), float(z_hat.std() / math.sqrt(len(z_hat)))
    z = math.exp(log_z)
    assert se > 0
    assert abs(mean - z) <= SE_TOLERANCE * se, f"mean Ẑ {mean:.5f} vs Z {z:.5f} (se {se:.5f})"


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kappa", [0.0, 1.0], ids=["sis", "smc"])
def test_tempered_estimate_is_unbiased(toy, one_thread, temperature, kappa):
    exact = enumerate_target(make_target(toy))
    results = twistlm.run_smc(
        make_target(toy, RUNS), 4, proposal="tempered", temperature=temperature, ess_threshold=kappa, seed=5
    )
    assert all(r.resampled_at == [] for r in results) == (kappa == 0.0)
    assert_unbiased(results, exact.log_z)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tempered_twisted_proposal_is_unbiased(toy, one_thread, temperature):
    """q ∝ (p0 ψ)^{1/τ} with a random twist, resampling every step."""
    exact = enumerate_target(make_target(toy))
    twist = twistlm.LinearTwist.for_lm(toy, init_scale=0.7, seed=3).double()
    results = twistlm.run_smc(
        make_target(toy, RUNS), 4, proposal="tempered", twist=twist, temperature=temperature, seed=9
    )
    assert_unbiased(results, exact.log_z)


class AfterAForceB(Tool):
    """Toy tool: after every 'a' the completion continues with 'b' (not sampled)."""

    name = "a->b"

    def is_trigger(self, token_text: str) -> bool:
        return token_text == "a"

    def __call__(self, completion: str) -> str | None:
        return "b"


def soft_potential(texts):
    return [0.0 if "c" in t else -2.0 * len(t) for t in texts]


def tool_log_z(lm, prompt: str, T: int) -> float:
    """Z of p0 with the tool's 'b' forced after every 'a', by depth-first enumeration (independent of smc.py)."""
    eos, a, b = lm.eos_token_id, lm.letters.index("a"), lm.letters.index("b")
    total = []

    def walk(prefix: list[int], logp: float):
        t = len(prefix)
        if t and (prefix[-1] == eos or t == T):
            total.append(logp + soft_potential([lm.decode(prefix)])[0])
            return
        if t and prefix[-1] == a:
            walk(prefix + [b], logp)  # forced: probability 1
            return
        state = lm.prefill([lm.encode(prompt)], 1)
        for tok in prefix:
            state = lm.step(state, torch.tensor([tok]))
        for v in range(lm.vocab_size):
            walk(prefix + [v], logp + float(state.logprobs[0, v]))

    walk([], 0.0)
    return float(torch.logsumexp(torch.tensor(total, dtype=torch.float64), 0))


def test_tool_tokens_weigh_one_under_the_tempered_proposal(toy, one_thread):
    log_z = tool_log_z(toy, "d", 4)
    target = make_target(toy, RUNS, prompt="d", potential=soft_potential, tool=AfterAForceB())
    results = twistlm.run_smc(target, 4, proposal="tempered", temperature=0.5, ess_threshold=0.0, seed=2)
    a, b = toy.letters.index("a"), toy.letters.index("b")
    for r in results[:50]:
        for ids in r.token_ids:
            assert all(tok != a or nxt == b for tok, nxt in zip(ids[:-1], ids[1:]))
    assert_unbiased(results, log_z)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_one_step_draws_follow_q_and_weights_are_p0_over_q(toy, one_thread, temperature):
    """T = 1, φ ≡ 1: each token v is drawn with q(v) = softmax(log p0 / τ)_v and weighs exactly p0(v) / q(v)."""
    target = make_target(toy, T=1, potential=None)
    log_p0 = toy.prefill(target.prompt_ids, 1).logprobs[0].to(torch.float64)
    log_q = torch.log_softmax(log_p0 / temperature, dim=0)
    K = 40_000
    res = twistlm.sis(target, K, proposal="tempered", temperature=temperature, seed=1)
    first = torch.tensor([ids[0] for ids in res.token_ids])
    expected = (log_p0 - log_q)[first]
    torch.testing.assert_close(res.log_weights, expected, rtol=0, atol=1e-9)
    freq = torch.bincount(first, minlength=toy.vocab_size).double() / K
    q = log_q.exp()
    assert torch.all((freq - q).abs() <= 4 * (q * (1 - q) / K).sqrt() + 1e-12), (freq, q)


def test_temperature_one_is_the_base_proposal(toy, one_thread):
    target = make_target(toy, 50)
    base = twistlm.run_smc(target, 4, seed=3)
    tempered = twistlm.run_smc(target, 4, proposal="tempered", temperature=1.0, seed=3)
    assert [r.token_ids for r in base] == [r.token_ids for r in tempered]
    assert [r.log_z for r in base] == pytest.approx([r.log_z for r in tempered], abs=1e-9)


@pytest.mark.parametrize("temperature", [0, -0.5, float("nan"), float("inf"), "2", True, None])
def test_bad_temperature_is_a_config_error(toy, temperature):
    with pytest.raises(ConfigError, match="temperature"):
        twistlm.run_smc(make_target(toy), 2, proposal="tempered", temperature=temperature)


def test_temperature_needs_the_tempered_proposal(toy):
    with pytest.raises(ConfigError, match="tempered"):
        twistlm.smc(make_target(toy), 2, temperature=0.5)
