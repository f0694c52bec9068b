"""End to end: ``twistlm evaluate`` on the toy LM (``--model toy``) with toy tasks registered by the test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from twistlm import LinearTwist, Target, ToyLM
from twistlm.cli import run_app
from twistlm.potentials import FunctionPotential, Potential, Sequences
from twistlm.tasks.registry import TASKS, Task, register_task

TASK = "toy-evaluate-test"
INFILL_TASK = "toy-evaluate-infill-test"


def _soft(texts):
    return [-1.5 * t.count("a") - 0.7 * t.count("c") for t in texts]


def _build(lm, max_new_tokens=None, num_prompts=1, weight=1.0):
    pot = FunctionPotential(lambda texts: [weight * v for v in _soft(texts)], name="soft", bounded=True)
    return Target(lm, prompt="ab", potential=pot, max_new_tokens=max_new_tokens or 3)


class _Likelihood(Potential):
    """φ(s) = p0(o | x, s) with o (token ids) read from extras["observation"], as InfillingPotential does."""

    bounded = True
    name = "toy-likelihood"
    observation = None

    def __init__(self, lm):
        self.lm = lm

    def log_phi(self, seqs: Sequences):
        out = []
        for i, (prompt, ids) in enumerate(zip(seqs.prompts, seqs.token_ids)):
            state = self.lm.prefill([self.lm.encode(prompt) + list(ids)], 1)
            total = 0.0
            for tok in seqs.extras["observation"][i]:
                total += float(state.logprobs[0, tok])
                state = self.lm.step(state, torch.tensor([tok]))
            out.append(total)
        return out


def _build_infill(lm, max_new_tokens=None, num_prompts=1):
    return Target(lm, prompt="ab", potential=_Likelihood(lm), max_new_tokens=max_new_tokens or 2)


@pytest.fixture(autouse=True)
def toy_tasks():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    register_task(Task(TASK, "soft toy potential (test)", _build, options={"weight": "scale of log φ"}))
    register_task(Task(INFILL_TASK, "toy infilling (test)", _build_infill))
    yield
    TASKS.pop(TASK, None)
    TASKS.pop(INFILL_TASK, None)
    torch.set_num_threads(before)


@pytest.fixture
def twist_dir(tmp_path):
    path = tmp_path / "mytwist"
    LinearTwist.for_lm(ToyLM(vocab_size=5, seed=1), init_scale=0.4, seed=2).save_pretrained(path)
    return path


def _run(args):
    return run_app(["evaluate", *args])


def test_evaluate_end_to_end(tmp_path, twist_dir):
    out = tmp_path / "out"
    code = _run([
        "--task", TASK, "--model", "toy", "--particles", "1,2,4,8", "--seeds", "200", "--out", str(out),
        "--twist", str(twist_dir), "--task-option", "weight=1.5", "--max-new-tokens", "3",
    ])  # fmt: skip
    assert code == 0
    for name in ("results.json", "bounds.png", "kl.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    assert not list(out.glob(".*.tmp"))
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["task"] == TASK and data["meta"]["task_options"] == {"weight": 1.5}
    assert data["exact_samples"]["method"] == "rejection" and data["exact_samples"]["num_accepted"] == 200
    assert isinstance(data["log_z_exact"], float) and data["log_z_best_source"] == "exact"
    entries = data["bounds"]["entries"]
    assert {e["proposal"] for e in entries} == {"base", "twist:mytwist"}
    assert sorted({e["num_particles"] for e in entries}) == [1, 2, 4, 8]
    for e in entries:
        assert e["lower"]["mean"] <= data["log_z_exact"] + 3 * e["lower"]["stderr"]
        assert e["upper"]["mean"] >= data["log_z_exact"] - 3 * e["upper"]["stderr"]
    for name in ("base", "twist:mytwist"):
        kl = data["kl"][name]
        assert math.isfinite(kl["kl_q_sigma"]["mean"]) and math.isfinite(kl["kl_sigma_q"]["mean"])
    report = (out / "report.md").read_text()
    assert "| proposal | KL(q‖σ) | KL(σ‖q) |" in report
    assert "| base |" in report and "| twist:mytwist |" in report
    assert "upper log Ẑ (K=8)" in report and "![bounds](bounds.png)" in report


def test_evaluate_bdmc_and_no_exact(tmp_path):
    out = tmp_path / "bdmc"
    args = ["--task", INFILL_TASK, "--model", "toy", "--particles", "1,4", "--seeds", "60", "-q"]
    assert _run([*args, "--out", str(out), "--exact", "bdmc", "--ending-tokens", "2", "--sampler", "sis"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert data["exact_samples"]["method"] == "bdmc" and data["exact_samples"]["num_pairs"] == 60
    assert data["bounds"]["num_exact_samples"] == 60 and data["bounds"]["entries"][0]["upper"]["n"] == 60

    out2 = tmp_path / "none"
    args[1] = TASK
    assert _run([*args, "--out", str(out2), "--exact", "none"]) == 0
    data = json.loads((out2 / "results.json").read_text())
    assert data["bounds"]["entries"][0]["upper"] is None and data["kl"]["base"]["kl_sigma_q"] is None
    assert "| base |" in (out2 / "report.md").read_text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "no-such-task"], "unknown task"),
        (["--task", TASK, "--particles", "0,4"], "positive"),
        (["--task", TASK, "--particles", "a,b"], "comma-separated"),
        (["--task", TASK, "--exact", "psychic"], "unknown --exact"),
        (["--task", TASK, "--task-option", "colour=red"], "no option 'colour'"),
        (["--task", TASK, "--twist", "/nonexistent/twist"], "twist directory not found"),
    ],
)
def test_evaluate_bad_input_exits_2(tmp_path, capsys, args, message):
    assert _run([*args, "--model", "toy", "--seeds", "4", "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_reference_log_z_uses_rejection_only_when_no_lower_bound_is_finite():
    """A rare goal: every run missed φ > 0, so the midpoint rule would return the upper bound alone."""
    from types import SimpleNamespace

    from twistlm.report import reference_log_z

    info = {"method": "rejection", "num_accepted": 3, "log_z_hat": -5.11}
    none_finite = SimpleNamespace(tightest=lambda: (-math.inf, -3.70))
    finite = SimpleNamespace(tightest=lambda: (-4.5, -3.70))
    assert reference_log_z(none_finite, info) == -5.11
    assert reference_log_z(finite, info) is None
    assert reference_log_z(none_finite, {**info, "num_accepted": 0}) is None
    assert reference_log_z(none_finite, {"method": "bdmc"}) is None
    assert reference_log_z(none_finite, None) is None
