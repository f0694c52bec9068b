"""Tools splice deterministic tokens into completions: Ẑ stays unbiased for the target p0-with-tool-outputs-forced."""

from __future__ import annotations

import math

import pytest
import torch

import twistlm
from twistlm.tools import CalculatorTool, Tool

NEG_INF = float("-inf")


class AfterAForceB(Tool):
    """Toy tool: after every 'a' the completion continues with 'b' (not sampled)."""

    name = "a->b"

    def is_trigger(self, token_text: str) -> bool:
        return token_text == "a"

    def __call__(self, completion: str) -> str | None:
        return "b"


def potential(texts):
    return [0.0 if "c" in t else -2.0 * len(t) for t in texts]


def exact_log_z(lm, prompt: str, T: int) -> float:
    """Z of p0 with the tool's tokens forced, by depth-first enumeration over the toy LM (independent of smc.py)."""
    eos, b = lm.eos_token_id, lm.letters.index("b")
    total = []

    def walk(prefix: list[int], logp: float):
        t = len(prefix)
        if t and (prefix[-1] == eos or t == T):
            total.append(logp + potential([lm.decode(prefix)])[0])
            return
        if t and prefix[-1] == lm.letters.index("a"):
            walk(prefix + [b], logp)  # forced: probability 1
            return
        state = lm.prefill([lm.encode(prompt)], 1)
        for tok in prefix:
            state = lm.step(state, torch.tensor([tok]))
        for v in range(lm.vocab_size):
            walk(prefix + [v], logp + float(state.logprobs[0, v]))

    walk([], 0.0)
    return float(torch.logsumexp(torch.tensor(total, dtype=torch.float64), 0))


@pytest.mark.parametrize("proposal", ["base", "twisted"])
def test_tool_target_estimate_is_unbiased(toy, proposal):
    T, runs = 4, 2000
    log_z = exact_log_z(toy, "d", T)
    twist = twistlm.LinearTwist.for_lm(toy, init_scale=0.5, seed=2).double() if proposal == "twisted" else None
    target = twistlm.Target(toy, prompts=["d"] * runs, potential=potential, max_new_tokens=T, tool=AfterAForceB())
    results = twistlm.run_smc(target, 4, proposal=proposal, twist=twist, seed=0)
    a, b = toy.letters.index("a"), toy.letters.index("b")
    for r in results[:50]:
        for ids in r.token_ids:
            for i, tok in enumerate(ids[:-1]):
                assert tok != a or ids[i + 1] == b
    z_hat = torch.tensor([r.log_z for r in results], dtype=torch.float64).exp()
    se = float(z_hat.std()) / math.sqrt(runs)
    assert abs(float(z_hat.mean()) - math.exp(log_z)) <= 4 * se


def test_calculator_tool_splices_results():
    tool = CalculatorTool()
    assert tool.is_trigger(" =") and not tool.is_trigger("+")
    assert tool("3 + 4 =") == " 7"
    assert tool("3 + 4 = ") == "7"
    assert tool("so 10 - 2 * 3 =") == " 4"
    assert tool("__import__('os') =") is None
    assert tool("no arithmetic here") is None


@pytest.mark.model
def test_calculator_tool_on_the_real_model(smol):
    """Every "<expression> =" the model writes is followed by the calculator's value, which it did not sample."""
    from twistlm.tasks.calculator import apply_calculator

    prompt = "Q: 2 + 2 - 1\nA: 2 + 2 = 4, 4 - 1 = 3\nQ: 5 + 3 - 2\nA: 5 + 3 = 8, 8 - 2 = 6\nQ: 7 - 1 + 4\nA:"
    target = twistlm.Target(smol, prompt=prompt, max_new_tokens=16, tool=CalculatorTool())
    res = twistlm.sis(target, 8, seed=0)
    checked = 0
    for text in res.texts:
        for i, ch in enumerate(text):
            if ch != "=":
                continue
            spliced, changed = apply_calculator(text[: i + 1])
            if changed and len(text) > i + 1:
                value = spliced[i + 1 :]
                assert text[i + 1 :].startswith(value[: len(text) - i - 1]), (text, value)
                checked += 1
    assert checked >= 4, res.texts


def test_conditional_smc_with_a_tool_checks_and_weights_the_reference(toy):
    tool = AfterAForceB()
    target = twistlm.Target(toy, prompt="d", potential=potential, max_new_tokens=4, tool=tool)
    a, b, c = (toy.letters.index(x) for x in "abc")
    ok = twistlm.run_smc(target, 1, ess_threshold=0.0, reference=[[a, b, c, c]])[0]
    # K = 1 clamped SIS: log w = log σ̃(s) − log q(s); the forced 'b' contributes nothing to p0 nor q.
    assert ok.log_weights[0] == pytest.approx(0.0)  # 'c' in the text: φ = 1; base proposal: q = p0
    with pytest.raises(twistlm.errors.ConfigError, match="disagrees with the tool"):
        twistlm.run_smc(target, 2, reference=[[a, c, c, c]])
