"""The judged likelihood potential (SUBJ's E-step reward with a wrong-label penalty), its GFlowNet reward, and the
subjectivity task's short form."""

from __future__ import annotations

import pytest
import torch

from test_gfn import exact_kl, make_trainer, toy_lm, _reward_sigma
from twistlm import Target
from twistlm.cli.app import USAGE_ERROR, run_app
from twistlm.errors import ConfigError
from twistlm.exact import enumerate_target
from twistlm.gfn.sampling import ActionSpace
from twistlm.gfn.trainer import GFNProblem
from twistlm.potentials import InfillingPotential, JudgedObservationPotential, Sequences

MAX_LEN = 3
TRUE, OTHER = "ab", "c"


STOP = 2
"""A rationale ends at token 2 (kept in its text, as "," ends a short SUBJ rationale); EOS is an ordinary token."""


def judged_target(lm, penalty: float) -> Target:
    return Target(lm, prompt="ca", potential=JudgedObservationPotential(lm, penalty), max_new_tokens=MAX_LEN,
                  stop_token_ids=(STOP,), stop_at_eos=False, extras={"observation": [TRUE], "alternatives": [[OTHER]]})


def judged_space(lm) -> ActionSpace:
    allowed = torch.ones(lm.vocab_size, dtype=torch.bool)
    allowed[STOP] = False
    return ActionSpace(allowed, (STOP,), 0, MAX_LEN)


def test_log_phi_is_the_likelihood_minus_the_penalty_where_p0_prefers_another_label(toy):
    s = [[2, 0, 3], [1], [], [3, 3], [0, 2]]
    seqs = Sequences(prompts=["ca"] * len(s), texts=[toy.decode(x) for x in s], token_ids=s,
                     prompt_index=[0] * len(s), extras={"observation": [TRUE] * len(s), "alternatives": [[OTHER]] * len(s)})
    true_lp = InfillingPotential(toy, observation=TRUE)(seqs)
    other_lp = InfillingPotential(toy, observation=OTHER)(seqs)
    wrong = other_lp > true_lp
    assert wrong.any() and (~wrong).any()  # both cases occur
    got = JudgedObservationPotential(toy, 7.5)(seqs)
    assert torch.allclose(got, true_lp - 7.5 * wrong.double(), atol=1e-12)
    assert torch.allclose(JudgedObservationPotential(toy, 0.0)(seqs), true_lp, atol=1e-12)
    with pytest.raises(ConfigError, match="penalty"):
        JudgedObservationPotential(toy, -1.0)
    no_alts = Sequences(prompts=["ca"], texts=["a"], token_ids=[[0]], prompt_index=[0], extras={"observation": [TRUE]})
    with pytest.raises(Exception, match="alternatives"):
        JudgedObservationPotential(toy, 1.0)(no_alts)


def test_the_judged_reward_targets_the_samplers_sigma(tmp_path):
    """σ ∝ R of the GFlowNet reward equals the enumerated σ of the judged target, sequence by sequence — the stop
    token and the sequences cut at T included (there the reward scores the observation without a stop) — and the
    penalty moves σ (it differs from the unpenalised posterior)."""
    lm = toy_lm()
    target = judged_target(lm, 3.0)
    trainer = make_trainer(GFNProblem(target, judged_space(lm)), tmp_path, objective="subtb")
    exact = enumerate_target(target).distribution()
    got = _reward_sigma(trainer)
    assert set(got) == set(exact)
    for key, p in exact.items():
        assert got[key] == pytest.approx(p, rel=1e-9, abs=1e-12), key
    plain = enumerate_target(judged_target(lm, 0.0)).distribution()
    assert max(abs(plain[k] - exact[k]) for k in exact) > 0.01
    assert any(len(k) == MAX_LEN and k[-1] != STOP for k in exact)  # cut sequences are in play


def test_subtb_reaches_the_judged_posterior(tmp_path, one_thread):
    lm = toy_lm()
    target = judged_target(lm, 3.0)
    trainer = make_trainer(GFNProblem(target, judged_space(lm)), tmp_path)
    before, _ = exact_kl(trainer)
    trainer.train()
    after, _ = exact_kl(trainer)
    assert before > 0.2 and after < 0.05, (before, after)


@pytest.mark.model
def test_the_short_subjectivity_form_and_its_gfn_problem(smol, shared_data):
    from twistlm.gfn.problems import SHORT_SUBJECTIVITY_PENALTY, SHORT_SUBJECTIVITY_RECIPE, build_problem, stop_token
    from twistlm.gfn.rewards import JudgedLikelihoodReward, reward_for

    data = str(shared_data / "subj/train.10.jsonl")
    problem = build_problem("subjectivity", smol, data=data, form="short")
    target = problem.target
    assert target.prompts[0].startswith("Classify this movie review") and target.prompts[0].endswith("This review is")
    assert target.max_new_tokens == 5 and problem.config == SHORT_SUBJECTIVITY_RECIPE
    assert problem.space.stop_ids == (stop_token(smol, ","),) and problem.info["task_options"]["penalty"] == 50.0
    assert target.potential.penalty == SHORT_SUBJECTIVITY_PENALTY
    label = target.extras["label"][0]
    assert target.extras["observation"][0].endswith(("objective.", "subjective.")[label])
    assert target.extras["alternatives"][0][0].endswith(("objective.", "subjective.")[1 - label])
    seeds = problem.buffer_seeds  # p0's "… <label> because it is" continuations, cut before the first non-word
    assert len(seeds) >= 8 and problem.info["buffer_seeds"] == sum(len(v) for v in seeds.values())
    for key, trajs in seeds.items():
        for g in trajs:
            assert 1 <= len(g.tokens) <= 5 and g.stop_token == stop_token(smol, ",")
            assert smol.decode(g.tokens).replace(" ", "").isalnum()
    reward = reward_for(target, problem.space.stop_ids)
    assert isinstance(reward, JudgedLikelihoodReward) and reward.prefix_defined
    # the sentence form keeps its unpenalised likelihood
    plain = build_problem("subjectivity", smol, data=data)
    assert isinstance(plain.target.potential, InfillingPotential) and plain.target.max_new_tokens == 24
    assert not isinstance(plain.target.potential, JudgedObservationPotential)


def test_classify_refuses_an_unknown_form(tmp_path, shared_data, capsys):
    labelled = str(shared_data / "subj/train.10.jsonl")
    code = run_app(["classify", "--labelled", labelled, "--data", labelled, "--form", "long"])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR and "--form" in err and "short" in err and "Traceback" not in err


def test_buffer_seeds_enter_the_replay_buffer_with_their_rewards(tmp_path, one_thread):
    """A problem's buffer seeds (here for two prompts) are in the buffer after the first update, each with its exact
    log R under p0, so replay draws them from the start."""
    from twistlm.gfn.trainer import GivenTrajectory
    from twistlm.gfn.trajectories import Trajectories

    lm = toy_lm()
    target = Target(lm, prompts=["ca", "ca"], potential=JudgedObservationPotential(lm, 3.0), max_new_tokens=MAX_LEN,
                    stop_token_ids=(STOP,), stop_at_eos=False,
                    extras={"observation": [TRUE, OTHER], "alternatives": [[OTHER], [TRUE]]})
    seeds = {0: [GivenTrajectory([0, 1], [False, False], STOP), GivenTrajectory([3], [False], STOP)],
             1: [GivenTrajectory([1, 1, 0], [False] * 3, STOP)]}
    problem = GFNProblem(target, judged_space(lm), buffer_seeds=seeds)
    trainer = make_trainer(problem, tmp_path, objective="subtb", max_steps=1, replay_prob=1.0, dedup_distance=0.0)
    trainer.training_step()
    for key, trajs in seeds.items():
        stored = {tuple(item[1]): item[0] for item in trainer.buffer.items[key]}
        for g in trajs:
            one = Trajectories([g.tokens], [g.forced], [0], [True], [g.stop_token])
            with torch.no_grad():
                batch, log_r = trainer.score(one, target.select([key]))
            assert stored[tuple(g.tokens)] == pytest.approx(float(log_r.gather(1, batch.last[:, None])), abs=1e-9)


def test_classify_refuses_a_policy_trained_in_another_form(tmp_path, shared_data, capsys):
    """Checked from the policy's JSON before any model is loaded: a short-form policy cannot sample sentence-form
    rationales."""
    import json

    from twistlm.gfn.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS, POLICY_INFO_NAME

    (tmp_path / POLICY_INFO_NAME).write_text(json.dumps({"task": "subjectivity", "task_options": {"form": "short"}}))
    (tmp_path / ADAPTER_CONFIG).write_text("{}")
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"")
    labelled = str(shared_data / "subj/train.10.jsonl")
    code = run_app(["classify", "--labelled", labelled, "--data", labelled, "--methods", "latent-em",
                    "--policy", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR and "form='short'" in err and "--form sets" in err and "Traceback" not in err
