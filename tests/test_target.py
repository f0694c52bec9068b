"""The Potential contract and Target validation (on the toy LM)."""

from __future__ import annotations

import pytest
import torch

import twistlm
from twistlm.errors import ConfigError, PotentialError, TwistLMError
from twistlm.potentials import (
    ContainsPotential,
    FunctionPotential,
    LengthPotential,
    RegexPotential,
    Sequences,
    potential_from_spec,
)


def seqs(*texts: str) -> Sequences:
    return Sequences(prompts=[""] * len(texts), texts=list(texts), token_ids=[[0] * len(t) for t in texts])


def test_builtin_potentials_on_text():
    assert RegexPotential(r"dra+gon")(seqs("a draagon!", "cat")).tolist() == [0.0, float("-inf")]
    assert ContainsPotential("a.b")(seqs("xa.by", "aXb")).tolist() == [0.0, float("-inf")]
    assert LengthPotential(0.5)(seqs("abc", "")).tolist() == [-1.5, 0.0]
    assert LengthPotential(0.5).bounded and not LengthPotential(-1).bounded


def test_specs_build_potentials_and_unknown_names_fail():
    assert potential_from_spec("contains:dragon").name == "contains:dragon"
    assert potential_from_spec("none")(seqs("x")).tolist() == [0.0]
    with pytest.raises(ConfigError, match="unknown potential 'nope'"):
        potential_from_spec("nope:1")
    with pytest.raises(ConfigError, match="needs an argument"):
        potential_from_spec("regex")
    with pytest.raises(ConfigError, match="bad regular expression"):
        potential_from_spec("regex:(")
    with pytest.raises(ConfigError, match="needs a number"):
        potential_from_spec("length:abc")


@pytest.mark.parametrize(
    "values, message",
    [
        ([float("nan"), 0.0], "NaN"),
        ([0.0], "returned 1 values for 2"),
        ([float("inf"), 0.0], r"\+inf"),
        (["a", "b"], "not numbers"),
    ],
)
def test_contract_violations_name_the_potential(values, message):
    pot = FunctionPotential(lambda texts: values, name="mine")
    with pytest.raises(PotentialError, match=f"'mine'.*{message}|{message}"):
        pot(seqs("x", "y"))


def test_bounded_promise_is_checked():
    pot = FunctionPotential(lambda texts: [0.5] * len(texts), name="liar", bounded=True)
    with pytest.raises(PotentialError, match="declares 0 ≤ φ ≤ 1"):
        pot(seqs("x"))


def test_target_validation(toy):
    with pytest.raises(ConfigError, match="exactly one of"):
        twistlm.Target(toy, max_new_tokens=3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        twistlm.Target(toy, prompt="a", max_new_tokens=0)
    with pytest.raises(TwistLMError, match="letters outside"):
        twistlm.Target(toy, prompt="xyz", max_new_tokens=3)
    with pytest.raises(ConfigError, match="extras"):
        twistlm.Target(toy, prompts=["a", "b"], extras={"gold": [1]}, max_new_tokens=3)


def test_extras_and_prompts_reach_the_potential(toy):
    seen = {}

    class Spy(twistlm.Potential):
        name = "spy"

        def log_phi(self, s):
            seen["prompts"], seen["gold"] = set(s.prompts), set(s.extras["gold"])
            return torch.zeros(len(s))

    target = twistlm.Target(toy, prompts=["a", "b"], potential=Spy(), extras={"gold": [1, 2]}, max_new_tokens=2)
    twistlm.run_smc(target, 3)
    assert seen["prompts"] <= {"a", "b"} and seen["gold"] <= {1, 2}


def test_stop_tokens_other_than_eos_stay_in_the_text(toy):
    stop = toy.letters.index("c")
    target = twistlm.Target(toy, prompt="a", max_new_tokens=5, stop_token_ids=[stop])
    res = twistlm.sis(target, 64, seed=0)
    for ids, text, stopped in zip(res.token_ids, res.texts, res.finished_by_eos):
        if stopped and ids[-1] == stop:
            assert text.endswith("c") and "c" not in text[:-1]
