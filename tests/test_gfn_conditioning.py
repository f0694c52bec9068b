"""A policy that reads the observation (:mod:`twistlm.conditioning`): q_θ(z | x, o) for latent-variable targets.

On the toy LM (letters only) the observation block is the observation's letters alone (``ObservationFirst("", "")``,
put in the registry for the test). Exactness: trained through the policy's own prompts, one tabular policy reaches
each observation's posterior (and cannot without the observation); as an SMC proposal it stays unbiased for Z,
reading its own prompts while p0 and φ read the target's.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from test_policy_proposal import RUNS, SE_TOLERANCE, z_score

import twistlm
from twistlm.conditioning import CONDITIONS, ObservationFirst, default_condition, get_condition
from twistlm.errors import ConfigError
from twistlm.exact import enumerate_target
from twistlm.gfn.config import GFNConfig
from twistlm.gfn.sampling import ActionSpace
from twistlm.gfn.toy_policy import TabularPolicy
from twistlm.gfn.trainer import GFNProblem, GFNTrainer
from twistlm.gfn.trajectories import Trajectories
from twistlm.policy_proposal import policy_prompt_ids
from twistlm.potentials import InfillingPotential
from twistlm.target import Target
from twistlm.toy import ToyLM

MAX_LEN = 3
OBSERVATIONS = ("a", "b")
PROMPT = "ca"
KL_REACHED = 0.05
KL_MIXTURE = 0.1
"""Without the observation one table row per prefix serves both posteriors: their KL stays far above KL_REACHED."""


@pytest.fixture
def toy_condition(monkeypatch):
    monkeypatch.setitem(CONDITIONS, "observation", ObservationFirst("", ""))


def toy_lm() -> ToyLM:
    return ToyLM(vocab_size=4, hidden_size=8, seed=3)


def two_observation_problem(lm, condition: str) -> GFNProblem:
    """One prompt x twice, with two different observed endings o: two different posteriors σ(z | x, o)."""
    target = Target(lm, prompts=[PROMPT] * len(OBSERVATIONS), potential=InfillingPotential(lm),
                    max_new_tokens=MAX_LEN, extras={"observation": list(OBSERVATIONS)})
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), tuple(target.stop_ids), 1, MAX_LEN)
    return GFNProblem(target, space, condition=condition)


def kl_per_prompt(trainer: GFNTrainer) -> list[float]:
    """Exact KL(σ_b ‖ q_b) for each prompt b, every trajectory of the action space enumerated."""
    space, lm = trainer.space, trainer.problem.target.lm
    actions = [v for v in range(lm.vocab_size) if v not in space.stop_ids]
    out = []
    for b in range(trainer.problem.target.num_prompts):
        trajs = Trajectories([], [], [], [], [], [])
        for m in range(space.min_len, space.max_len + 1):
            for z in itertools.product(actions, repeat=m):
                cut = m == space.max_len
                trajs = trajs.concat(Trajectories([list(z)], [[False] * m], [b], [not cut],
                                                  [-1 if cut else space.stop_ids[0]]))
        with torch.no_grad():
            batch, log_r = trainer.score(trajs, trainer.problem.target)
        log_q = batch.trajectory_log_q().double()
        assert float(log_q.exp().sum()) == pytest.approx(1.0, abs=1e-9)
        final = log_r.gather(1, batch.last[:, None]).squeeze(1)
        log_sigma = final - torch.logsumexp(final, 0)
        out.append(float((log_sigma.exp() * (log_sigma - log_q)).sum()))
    return out


def trainer_for(problem, tmp_path, objective: str, steps: int = 300) -> GFNTrainer:
    config = GFNConfig(output_dir=str(tmp_path / objective), objective=objective, learning_rate=0.2, max_steps=steps,
                       warmup_steps=0, lr_scheduler_type="constant", prompts_per_step=2, samples_per_prompt=16,
                       replay_prob=0.0, tempered_prob=0.0, save_steps=0, logging_steps=100, max_grad_norm=0.0,
                       plot=False)
    return GFNTrainer(TabularPolicy(problem.target.lm), problem, config)


def test_a_policy_reading_the_observation_reaches_each_posterior(tmp_path, one_thread, toy_condition):
    """SubTB, 600 updates × 2 prompts × 16 trajectories, tabular policy, lr 0.2: KL(σ_o‖q(· | x, o)) from 6.5–7.1 to
    < 0.05 for both o. (Not vargrad: on this peaked toy most batches are 16 copies of one trajectory, where its
    gradient is 0 — it is tested on the tempered toy target in test_gfn.py; TB's two log Z need longer.)"""
    trainer = trainer_for(two_observation_problem(toy_lm(), "observation"), tmp_path, "subtb", steps=600)
    before = kl_per_prompt(trainer)
    trainer.train()
    after = kl_per_prompt(trainer)
    assert min(before) > 0.2 and max(after) < KL_REACHED, (before, after)


def test_without_the_observation_one_policy_cannot_fit_both_posteriors(tmp_path, one_thread, toy_condition):
    trainer = trainer_for(two_observation_problem(toy_lm(), "prompt"), tmp_path, "subtb")
    trainer.train()
    assert max(kl_per_prompt(trainer)) > KL_MIXTURE


def test_smc_with_a_policy_reading_the_observation_is_unbiased(toy, toy_condition):
    """p0 and φ read the target's prompt "a", the policy "ab" + "a": Ẑ unbiased for Z over 2000 runs."""
    potential = InfillingPotential(toy)
    exact = enumerate_target(Target(toy, prompt="a", potential=potential, max_new_tokens=4,
                                    extras={"observation": ["ab"]}))
    policy = TabularPolicy(toy)
    with torch.no_grad():
        policy.table.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    policy.condition = get_condition("observation")
    target = Target(toy, prompts=["a"] * RUNS, potential=potential, max_new_tokens=4,
                    extras={"observation": ["ab"] * RUNS})
    assert policy_prompt_ids(policy, target)[0] == toy.encode("ab") + toy.encode("a")
    results = twistlm.run_smc(target, 4, proposal="policy", policy=policy, seed=3)
    assert all(key[0] == tuple(toy.encode("aba")) for key in policy.index), "the policy must read its own prompts"
    assert abs(z_score(results, exact.log_z)) <= SE_TOLERANCE


def test_observation_first_prompts_on_smollm2(smol):
    """Text observations are tokenized (whitespace dropped), token ids used as they are; x comes last, unchanged."""
    target = Target(smol, prompts=["Once upon a time", "It rained."], potential=InfillingPotential(smol),
                    max_new_tokens=4, extras={"observation": [" the end.", smol.tokenize(" sunny")]})
    prompts = get_condition("observation")(target)
    head, sep = smol.tokenize("Ending: "), smol.tokenize("\n\n")
    assert prompts[0] == head + smol.tokenize("the end.") + sep + target.prompt_ids[0]
    assert prompts[1] == head + smol.tokenize(" sunny") + sep + target.prompt_ids[1]
    assert default_condition(target) == "observation"
    plain = Target(smol, prompt="Once", max_new_tokens=4)
    assert default_condition(plain) == "prompt" and get_condition("prompt")(plain) == plain.prompt_ids
    with pytest.raises(ConfigError, match="extras\\['observation'\\]"):
        get_condition("observation")(plain)
    with pytest.raises(ConfigError, match="unknown policy condition 'telepathy'"):
        get_condition("telepathy")


@pytest.mark.model
def test_a_saved_policy_records_and_restores_what_it_reads(tmp_path, one_thread):
    from twistlm.gfn.policy import LoRAPolicy, LoraSettings, load_policy

    policy = LoRAPolicy.create(twistlm.load_lm(), LoraSettings(r=2, alpha=4))
    policy.save_pretrained(tmp_path / "pol", task="infilling", extra={"condition": "observation"})
    loaded = load_policy(twistlm.load_lm(), tmp_path / "pol", task="infilling")
    assert loaded.condition is CONDITIONS["observation"]
    info_path = tmp_path / "pol" / "gfn_policy.json"
    info = json.loads(info_path.read_text())
    info["condition"] = "telepathy"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="reads its prompt as 'telepathy'"):
        load_policy(twistlm.load_lm(), tmp_path / "pol")
    del info["condition"]  # policies saved before conditioning existed read the target's prompts
    info_path.write_text(json.dumps(info))
    assert load_policy(twistlm.load_lm(), tmp_path / "pol").condition is CONDITIONS["prompt"]


def test_vargrad_needs_two_samples_per_prompt():
    with pytest.raises(ConfigError, match="samples_per_prompt ≥ 2"):
        GFNConfig(objective="vargrad", samples_per_prompt=1)
    assert math.isfinite(GFNConfig(objective="vargrad").learning_rate)
