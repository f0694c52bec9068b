"""GFlowNet fine-tuning (twistlm.gfn): objectives reach q ∝ R on an enumerable toy target, on- and off-policy;
prefix scoring in a constant number of passes equals per-prefix scoring; buffer, tools, resume, errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twistlm import Target, ToyLM
from twistlm.cli.app import USAGE_ERROR, run_app
from twistlm.errors import ConfigError, TwistLMError
from twistlm.exact import enumerate_target
from twistlm.gfn.config import GFNConfig
from twistlm.gfn.objectives import subtb_loss, tb_loss
from twistlm.gfn.replay import ReplayBuffer, edit_distance
from twistlm.gfn.sampling import ActionSpace, sample_trajectories
from twistlm.gfn.scoring import prefix_pass, suffix_at_states
from twistlm.gfn.toy_policy import TabularPolicy
from twistlm.gfn.trainer import GFNProblem, GFNTrainer
from twistlm.gfn.trajectories import StateBatch, Trajectories, state_index
from twistlm.html import read_page_data
from twistlm.potentials import FunctionPotential, InfillingPotential, TemperedPotential
from twistlm.tasks.registry import TASKS, Task
from twistlm.trainloop import list_checkpoints

HERE = Path(__file__).resolve().parent
MAX_LEN = 3


def toy_lm() -> ToyLM:
    return ToyLM(vocab_size=4, hidden_size=8, seed=3)


def tempered_problem(lm, min_len=0, max_len=MAX_LEN, tau=0.5) -> GFNProblem:
    target = Target(lm, prompt="ab", potential=TemperedPotential(lm, tau), max_new_tokens=max_len)
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), tuple(target.stop_ids), min_len, max_len)
    return GFNProblem(target, space)


def latent_problem(lm) -> GFNProblem:
    target = Target(lm, prompt="ca", potential=InfillingPotential(lm, observation="ab"), max_new_tokens=MAX_LEN)
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), tuple(target.stop_ids), 1, MAX_LEN)
    return GFNProblem(target, space)


def all_trajectories(lm, space: ActionSpace) -> Trajectories:
    """Every trajectory of the action space: stops at min_len … max_len − 1 actions, cuts at max_len."""
    actions = [v for v in range(lm.vocab_size) if bool(space.allowed[v]) and v not in space.stop_ids]
    trajs = Trajectories([], [], [], [], [], [])
    for m in range(space.min_len, space.max_len + 1):
        for z in itertools.product(actions, repeat=m):
            cut = m == space.max_len
            trajs = trajs.concat(
                Trajectories([list(z)], [[False] * m], [0], [not cut], [-1 if cut else space.stop_ids[0]])
            )
    return trajs


def exact_kl(trainer: GFNTrainer) -> tuple[float, float]:
    """KL(σ‖q) with σ ∝ R over every trajectory, and Σ q (must be 1)."""
    trajs = all_trajectories(trainer.problem.target.lm, trainer.space)
    with torch.no_grad():
        batch, log_r = trainer.score(trajs, trainer.problem.target)
    log_q = batch.trajectory_log_q().double()
    final = log_r.gather(1, batch.last[:, None]).squeeze(1)
    log_sigma = final - torch.logsumexp(final, 0)
    return float((log_sigma.exp() * (log_sigma - log_q)).sum()), float(log_q.exp().sum())


def make_trainer(problem, tmp_path, **overrides) -> GFNTrainer:
    policy = TabularPolicy(problem.target.lm)
    settings = dict(
        output_dir=str(tmp_path / "run"),
        learning_rate=0.2,
        max_steps=200,
        warmup_steps=0,
        lr_scheduler_type="constant",
        prompts_per_step=1,
        samples_per_prompt=16,
        replay_prob=0.0,
        tempered_prob=0.0,
        save_steps=0,
        logging_steps=50,
        max_grad_norm=0.0,
        plot=False,
        dedup_distance=0.0,
    )
    settings.update(overrides)
    return GFNTrainer(policy, problem, GFNConfig(**settings))


# ------------------------------------------------------------------------------------------- objectives reach σ


@pytest.mark.parametrize(
    "objective, extra",
    [
        ("subtb", {}),
        ("tb", {"max_steps": 400}),  # one log Z for every trajectory: slower and noisier than SubTB's flows
        ("subtb", {"tempered_prob": 1.0, "temperature_low": 0.5, "temperature_high": 2.0}),
        # Replay concentrates updates on 8 trajectories: at lr 0.2 the tabular policy oscillates around q ∝ R.
        ("subtb", {"replay_prob": 0.5, "buffer_capacity": 8, "learning_rate": 0.1, "max_steps": 400}),
        ("subtb", {"epsilon": 0.3}),
        ("vargrad", {}),
    ],
    ids=["subtb", "tb", "subtb-tempered", "subtb-replay", "subtb-epsilon", "vargrad"],
)
def test_objectives_drive_the_policy_to_sigma(tmp_path, one_thread, objective, extra):
    """200 updates × 16 trajectories (TB and replay: 400), tabular policy, AdamW lr 0.2 (replay: 0.1): KL(σ‖q) from
    0.30 to < 0.05 nats, also off-policy
    (tempered behaviour, replay, ε-mixing: the fixed point q ∝ R does not move)."""
    problem = tempered_problem(toy_lm(), min_len=1)
    trainer = make_trainer(problem, tmp_path, objective=objective, **extra)
    before, total = exact_kl(trainer)
    assert total == pytest.approx(1.0, abs=1e-9)
    trainer.train()
    after, total = exact_kl(trainer)
    assert total == pytest.approx(1.0, abs=1e-9)
    assert before > 0.2 and after < 0.05, (before, after)


def _reward_sigma(trainer: GFNTrainer) -> dict[tuple[int, ...], float]:
    """σ ∝ R over every trajectory, keyed by the sampler's sequence (the tokens, then the stop token if stopped)."""
    trajs = all_trajectories(trainer.problem.target.lm, trainer.space)
    with torch.no_grad():
        batch, log_r = trainer.score(trajs, trainer.problem.target)
    final = log_r.gather(1, batch.last[:, None]).squeeze(1)
    probs = torch.softmax(final, 0).tolist()
    keys = [tuple(z) + ((stop,) if done else ()) for z, done, stop in zip(trajs.tokens, trajs.stopped, trajs.stop_token)]
    return dict(zip(keys, probs))


@pytest.mark.parametrize("kind", ["potential", "tempered"])
def test_the_reward_targets_the_samplers_sigma_including_cut_sequences(tmp_path, kind):
    """σ ∝ R equals the enumerated σ of the same target, sequence by sequence — also for the sequences that reach T
    without stopping (the target truncates there: no p0(⊤) factor, so R(z_1:T) = p0(z_1:T) φ)."""
    lm = toy_lm()
    if kind == "tempered":
        potential = TemperedPotential(lm, 0.5, max_new_tokens=MAX_LEN)
    else:
        potential = FunctionPotential(lambda texts: [-0.7 * t.count("b") for t in texts], name="no-b")
    target = Target(lm, prompt="ab", potential=potential, max_new_tokens=MAX_LEN)
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), tuple(target.stop_ids), 0, MAX_LEN)
    trainer = make_trainer(GFNProblem(target, space), tmp_path, objective="tb")
    exact = enumerate_target(target).distribution()
    got = _reward_sigma(trainer)
    assert set(got) == set(exact)
    assert any(len(k) == MAX_LEN and k[-1] not in target.stop_ids for k in exact)  # cut sequences are in play
    for key, p in exact.items():
        assert got[key] == pytest.approx(p, rel=1e-9, abs=1e-12), key


def test_subtb_on_a_latent_reward_reaches_the_posterior(tmp_path, one_thread):
    """R(z ⊤) = p0(x z y) with an observed y (infilling form): SubTB's policy matches the posterior over z."""
    problem = latent_problem(toy_lm())
    trainer = make_trainer(problem, tmp_path)
    before, _ = exact_kl(trainer)
    trainer.train()
    after, _ = exact_kl(trainer)
    assert before > 0.2 and after < 0.05, (before, after)


def test_sft_fits_given_trajectories(tmp_path, one_thread):
    from twistlm.gfn.trainer import GivenTrajectory

    problem = tempered_problem(toy_lm(), min_len=1)
    problem.given = {0: GivenTrajectory([1, 0], [False, False], problem.space.stop_ids[0])}
    trainer = make_trainer(problem, tmp_path, objective="sft", max_steps=60)
    trainer.train()
    trajs = Trajectories([[1, 0]], [[False, False]], [0], [True], [problem.space.stop_ids[0]])
    with torch.no_grad():
        batch, _ = trainer.score(trajs, problem.target)
    assert float(batch.trajectory_log_q()[0]) > math.log(0.9)


def test_subtb_and_tb_vanish_exactly_at_the_optimum():
    """A policy with q(z ⊤) ∝ R(z ⊤) (built from flows) gives SubTB = 0 and TB = 0 with log Z."""
    g = torch.Generator().manual_seed(0)
    n, S = 5, 4
    log_r = torch.randn(n, S, generator=g, dtype=torch.float64)
    log_f = torch.randn(n, S, generator=g, dtype=torch.float64)  # any flows; then define q to satisfy balance
    stop = log_r - log_f  # log q(⊤ | s_i) = log R − log F
    action = log_f[:, 1:] - log_f[:, :-1] + 0.0  # log q(s_{i+1} | s_i) = log F_{i+1} − log F_i (P_B = 1)
    action = torch.cat([action, torch.zeros(n, 1, dtype=torch.float64)], dim=1)
    batch = StateBatch(action, stop, log_r, torch.ones(n, S, dtype=torch.bool), torch.full((n,), S - 1))
    loss, _ = subtb_loss(batch)
    assert float(loss) == pytest.approx(0.0, abs=1e-20)
    log_z = log_f[:, 0]
    assert float(tb_loss(batch, log_z=log_z)[0]) == pytest.approx(0.0, abs=1e-20)


# ------------------------------------------------------------------------------------------- states and tools


def test_forced_tool_tokens_are_not_actions():
    trajs = Trajectories([[5, 6, 7, 8, 9]], [[False, True, True, False, False]], [0], [True], [1])
    assert trajs.state_lengths(0) == [0, 3, 4, 5]
    assert trajs.num_actions(0) == 3
    states, terminable, last = state_index(trajs, min_len=0, stop_after_tool=True)
    assert states == [[0, 3, 4, 5]] and int(last[0]) == 3
    assert terminable[0].tolist() == [False, True, False, True]  # after the tool's output, and where it ended


class _EchoTool:
    """A toy tool: after token 0 ('a') it forces 'bb'."""

    name = "echo"

    def trigger_ids(self, lm):
        return [0]

    def __call__(self, completion):
        return "bb" if completion.endswith("a") else None


def test_sampler_forces_tool_tokens_and_scores_only_actions(tmp_path, one_thread):
    lm = toy_lm()
    problem = tempered_problem(lm, min_len=0)
    problem.target.tool = _EchoTool()
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), problem.space.stop_ids, 0, MAX_LEN)
    trajs = sample_trajectories(lm, problem.target.prompt_ids, 64, space, torch.Generator().manual_seed(0),
                                tool=problem.target.tool)
    seen = 0
    for toks, forced in zip(trajs.tokens, trajs.forced):
        for k, t in enumerate(toks):
            if t == 0 and not forced[k]:
                assert toks[k + 1 : k + 3] == [1, 1] and forced[k + 1 : k + 3] == [True, True]
                seen += 1
        assert sum(not f for f in forced) <= MAX_LEN
    assert seen > 0
    trainer = make_trainer(problem, tmp_path)
    with torch.no_grad():
        batch, _ = trainer.score(trajs, problem.target)
    # the policy (= p0 here) gives each trajectory exactly the product of its action probabilities and stop
    i = next(k for k, f in enumerate(trajs.forced) if any(f) and trajs.stopped[k])
    toks, forced = trajs.tokens[i], trajs.forced[i]
    state = lm.prefill(problem.target.prompt_ids, 1)
    expect = 0.0
    for t, f in zip(toks, forced):
        if not f:
            expect += float(state.logprobs[0, t])
        state = lm.step(state, torch.tensor([t]))
    expect += float(state.logprobs[0, trajs.stop_token[i]])
    assert float(batch.trajectory_log_q()[i]) == pytest.approx(expect, abs=1e-6)


def test_min_and_max_length_are_respected(one_thread):
    lm = toy_lm()
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), (lm.eos_token_id,), 2, 3)
    target = Target(lm, prompt="ab", max_new_tokens=3)
    trajs = sample_trajectories(lm, target.prompt_ids, 200, space, torch.Generator().manual_seed(1))
    lengths = {len(t) for t in trajs.tokens}
    assert lengths <= {2, 3} and 3 in lengths
    assert all(s == (len(t) < 3) for t, s in zip(trajs.tokens, trajs.stopped))


# ------------------------------------------------------------------------------------------- scoring


def test_suffix_at_every_state_equals_per_prefix_scoring_on_the_toy():
    lm = toy_lm()
    prompts = [lm.encode("ab"), lm.encode("c")]
    seqs = [[0, 1, 2], [2], []]
    rows = [0, 1, 0]
    suffixes = [[1, 0], [0], [2, 2, 1]]
    states = [list(range(len(s) + 1)) for s in seqs]
    fast = suffix_at_states(lm, prefix_pass(lm, prompts, rows, seqs), states, suffixes)
    for i, (s, y) in enumerate(zip(seqs, suffixes)):
        for a, m in enumerate(states[i]):
            st = lm.prefill([prompts[rows[i]] + s[:m]], 1)
            assert float(fast[i, a]) == pytest.approx(float(lm.score_tokens(st, [y], [0])[0]), abs=1e-9)


@pytest.mark.model
def test_suffix_at_every_state_equals_per_prefix_scoring_on_smollm2(smol):
    from twistlm.tasks.arithmetic import few_shot_prompt

    tok = smol.tokenize
    prompts = [smol.encode(few_shot_prompt("Question: 2 + 5 - 3 = ? Answer:", 1)),
               smol.encode(few_shot_prompt("Question: 9 + 1 = ? Answer:", 1))]
    seqs = [tok(" 2 + 5 = 7, 7 - 3 = 4"), tok(" 9 + 1 = 10"), tok(" 2 +")]
    rows = [0, 1, 0]
    suffixes = [tok(". The answer is 4."), tok(". The answer is 10."), tok(".")]
    states = [list(range(len(s) + 1)) for s in seqs]
    with torch.no_grad():
        fast = suffix_at_states(smol, prefix_pass(smol, prompts, rows, seqs), states, suffixes)
        for i, (s, y) in enumerate(zip(seqs, suffixes)):
            for a, m in enumerate(states[i]):
                st = smol.prefill([prompts[rows[i]] + s[:m]], 1)
                assert float(fast[i, a]) == pytest.approx(float(smol.score_tokens(st, [y], [0])[0]), abs=2e-3)


# ------------------------------------------------------------------------------------------- replay buffer


def test_replay_buffer_is_bounded_deduplicated_and_prioritised():
    buf = ReplayBuffer(capacity=3)
    for k, r in enumerate([-5.0, -1.0, -3.0, -4.0]):
        buf.add(7, [k], [False], True, 0, r)
    assert sorted(it[0] for it in buf.items[7]) == [-4.0, -3.0, -1.0]  # the lowest (−5) was dropped
    assert not buf.add(7, [1], [False], True, 0, -9.0)  # a duplicate with a lower reward changes nothing
    assert buf.add(7, [1], [False], True, 0, -0.5)  # a higher one replaces it
    assert len(buf) == 3
    near = ReplayBuffer(capacity=5, dedup_distance=0.25)
    near.add(0, [1, 2, 3, 4], [False] * 4, True, 0, -2.0)
    assert not near.add(0, [1, 2, 3, 5], [False] * 4, True, 0, -3.0)  # distance 1 < 0.25 · 8
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    big = ReplayBuffer(capacity=10)
    for k in range(10):
        big.add(0, [k], [False], True, 0, 0.0 if k == 0 else -10.0)
    gen = torch.Generator().manual_seed(0)
    draws = [t for _ in range(100) for t in big.sample([0], 5, gen).tokens]
    assert sum(t == [0] for t in draws) > 450  # ∝ exp(log R): item 0 has e^10 times the weight of each other
    state = big.state_dict()
    again = ReplayBuffer()
    again.load_state_dict(state)
    assert again.items == big.items
    assert big.sample([1], 2, torch.Generator()) is None  # an empty key


# ------------------------------------------------------------------------------------------- resume, errors


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {here!r})
from test_gfn import tempered_problem, toy_lm, make_trainer
from pathlib import Path

class KillAfterSave:
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 8:
            os.kill(os.getpid(), signal.SIGKILL)

trainer = make_trainer(tempered_problem(toy_lm(), min_len=1), Path({tmp!r}), max_steps=12, save_steps=4,
                       replay_prob=0.3, tempered_prob=0.3)
trainer.add_callback(KillAfterSave())
trainer.train()
"""


def test_sigkill_then_resume_equals_the_uninterrupted_run(tmp_path, one_thread):
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(here=str(HERE), tmp=str(killed))], check=False,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(killed / "run")] == ["checkpoint-4", "checkpoint-8"]
    resumed = make_trainer(tempered_problem(toy_lm(), min_len=1), killed, max_steps=12, save_steps=4,
                           replay_prob=0.3, tempered_prob=0.3, resume=True)
    resumed.train()
    straight = make_trainer(tempered_problem(toy_lm(), min_len=1), tmp_path / "straight", max_steps=12,
                            save_steps=4, replay_prob=0.3, tempered_prob=0.3)
    straight.train()
    assert torch.equal(resumed.policy.table, straight.policy.table)
    assert resumed.buffer.items == straight.buffer.items
    assert resumed.state.log_history == straight.state.log_history


def test_subtb_refuses_a_potential_not_defined_on_prefixes(tmp_path):
    lm = toy_lm()
    target = Target(lm, prompt="ab", potential=FunctionPotential(lambda texts: [0.0 for _ in texts]), max_new_tokens=3)
    space = ActionSpace(torch.ones(lm.vocab_size, dtype=torch.bool), tuple(target.stop_ids), 1, 3)
    problem = GFNProblem(target, space)
    with pytest.raises(ConfigError, match="not defined on prefixes"):
        make_trainer(problem, tmp_path, objective="subtb")
    make_trainer(problem, tmp_path, objective="tb")  # trajectory balance needs the final reward only


def test_nan_loss_stops_naming_the_step_and_term(tmp_path, one_thread, monkeypatch):
    """A NaN reward at step 4 stops the run with one error naming the step and the term; checkpoint-3 stays intact."""
    problem = tempered_problem(toy_lm(), min_len=1)
    trainer = make_trainer(problem, tmp_path, max_steps=6, save_steps=1, save_total_limit=None)
    real = trainer.score

    def score(trajs, sub):
        batch, log_r = real(trajs, sub)
        if trainer.state.global_step == 3:
            batch.log_reward = batch.log_reward * float("nan")
        return batch, log_r

    monkeypatch.setattr(trainer, "score", score)
    with pytest.raises(TwistLMError, match=r"at step 4 \(non-finite term: subtb"):
        trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "checkpoint-3"


def test_a_policy_with_nan_weights_is_named(tmp_path, one_thread):
    trainer = make_trainer(tempered_problem(toy_lm(), min_len=1), tmp_path, max_steps=2)
    trainer.policy.table.data.fill_(float("nan"))
    with pytest.raises(TwistLMError, match="policy's log-probabilities are NaN"):
        trainer.train()


@pytest.fixture
def toy_gfn_task(monkeypatch):
    def build(lm, max_new_tokens=None, num_prompts=1):
        return Target(lm, prompts=["ab"] * num_prompts, potential=TemperedPotential(lm, 0.5),
                      max_new_tokens=max_new_tokens or 3)

    monkeypatch.setitem(TASKS, "toy-tempered", Task("toy-tempered", "test task", build))


def test_cli_train_gfn_end_to_end_and_refusals(tmp_path, toy_gfn_task, capsys, one_thread):
    out = tmp_path / "gfn"
    argv = ["train-gfn", "--task", "toy-tempered", "--model", "toy", "--out", str(out), "--steps", "4",
            "--save-steps", "2", "--logging-steps", "2", "-t", "samples_per_prompt=4", "-t", "prompts_per_step=1",
            "-q"]
    assert run_app(argv) == 0, capsys.readouterr().err
    assert (out / "training_config.json").is_file() and (out / "training_curve.png").is_file()
    page = read_page_data((out / "training.html").read_text(encoding="utf-8"))  # beside the curve (issue 14)
    assert [s["step"] for s in page["samples"]] == [2, 4] and "log_reward" in page["samples"][0]["samples"][0]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    assert run_app(argv) == USAGE_ERROR  # --out holds a run
    assert "not empty" in capsys.readouterr().err
    assert run_app(argv + ["--overwrite"]) == 0


@pytest.mark.parametrize("flag, expected", [([], "tb"), (["--objective", "subtb"], None)])
def test_cli_train_gfn_takes_the_tasks_recipe_where_no_flag_is_given(tmp_path, monkeypatch, capsys, one_thread,
                                                                     flag, expected):
    """A potential scored on complete sequences only (no reward at intermediate states): the generic problem's recipe
    is trajectory balance, used when --objective is not given; an explicit SubTB is refused with the reason."""
    def build(lm, max_new_tokens=None, num_prompts=1):
        pot = FunctionPotential(lambda texts: [-0.5 * len(t) for t in texts], name="short")
        return Target(lm, prompts=["ab"] * num_prompts, potential=pot, max_new_tokens=max_new_tokens or 3)

    monkeypatch.setitem(TASKS, "toy-final", Task("toy-final", "test task", build))
    out = tmp_path / "gfn"
    argv = ["train-gfn", "--task", "toy-final", "--model", "toy", "--out", str(out), "--steps", "2",
            "--save-steps", "0", "-q", *flag]
    code = run_app(argv)
    err = capsys.readouterr().err
    if expected is None:
        assert code == USAGE_ERROR and "not defined on prefixes" in err.replace("\n", " ")
    else:
        assert code == 0, err
        config = json.loads((out / "training_config.json").read_text())
        assert config["objective"] == expected and config["tempered_prob"] == 0.0 and config["max_steps"] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "no-such-task"], "unknown task 'no-such-task'"),
        (["--task", "toy-tempered", "--objective", "db"], "unknown objective 'db'"),
        (["--task", "toy-tempered", "-t", "lora_rank=3"], "unknown --train-option 'lora_rank'"),
        (["--task", "toy-tempered", "-t", "replay_prob=2"], "replay_prob must lie in [0, 1]"),
        (["--task", "toy-tempered", "-t", "objective=tb"], "use its own flag"),
    ],
)
def test_cli_train_gfn_bad_input(tmp_path, toy_gfn_task, capsys, extra, message):
    code = run_app(["train-gfn", "--model", "toy", "--out", str(tmp_path / "x"), "--steps", "2", *extra])
    assert code == USAGE_ERROR
    err = capsys.readouterr().err
    assert message in err.replace("\n", " ") and len(err.strip().splitlines()) <= 3


def test_arithmetic_problem_without_answers_is_refused(tmp_path, shared_data):
    from twistlm.gfn.problems import build_problem

    bad = tmp_path / "noanswers.json"
    bad.write_text(json.dumps([{"str_query": "Question: 1 + 2 = ? Answer:"}]))
    with pytest.raises(TwistLMError, match="num_sol"):
        build_problem("arithmetic", toy_lm(), data=str(bad))


# ------------------------------------------------------------------------------------------- the LoRA policy


@pytest.mark.model
def test_lora_policy_saves_and_reloads_with_peft(tmp_path, one_thread):
    from peft import PeftModel

    import twistlm
    from twistlm.gfn.policy import LoRAPolicy, LoraSettings, load_policy

    lm = twistlm.load_lm()  # a private copy: attaching an adapter changes the model in place
    policy = LoRAPolicy.create(lm, LoraSettings(r=2, alpha=4))
    with torch.no_grad():
        for name, p in policy.lm.peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    policy.save_pretrained(tmp_path / "pol", task="arithmetic")
    ids = lm.encode("Question: 2 + 3 = ? Answer:")
    expect = policy.lm.prefill([ids], 1).logprobs
    with policy.base():
        base = policy.lm.prefill([ids], 1).logprobs
    assert not torch.allclose(expect, base)
    fresh = twistlm.load_lm()
    again = load_policy(fresh, tmp_path / "pol", task="arithmetic")
    assert torch.allclose(again.prefill([ids], 1).logprobs, expect, atol=1e-5)
    plain = PeftModel.from_pretrained(twistlm.load_lm().model, str(tmp_path / "pol"))
    assert plain is not None
    with pytest.raises(ConfigError, match="trained for task 'arithmetic'"):
        load_policy(twistlm.load_lm(), tmp_path / "pol", task="gsm8k")
    (tmp_path / "pol" / "adapter_model.safetensors").unlink()
    with pytest.raises(TwistLMError, match="adapter_model.safetensors"):
        load_policy(twistlm.load_lm(), tmp_path / "pol")


def test_policy_for_another_base_model_is_refused(tmp_path):
    import json

    from twistlm.gfn.policy import load_policy
    from twistlm.lm import HFLM

    folder = tmp_path / "pol"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text("{}")
    (folder / "gfn_policy.json").write_text(json.dumps({"base_model": "gpt2", "vocab_size": 50257}))

    class FakeHF(HFLM):
        def __init__(self):
            self.name = "SmolLM2"
            self._vocab = 49152

    with pytest.raises(ConfigError, match="trained on base model 'gpt2'"):
        load_policy(FakeHF(), folder)
