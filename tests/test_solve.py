"""Greedy / temperature decoding and ``twistlm solve``: vote and rate arithmetic, greedy = argmax path, the task
answer hooks, and the CLI (toy LM through a test task; the embedded model on 2 arithmetic problems, marked ``model``).
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import twistlm
from twistlm.cli import run_app
from twistlm.cli import solve as solve_cli
from twistlm.errors import ConfigError
from twistlm.solve import (
    ProblemResult,
    SolveResult,
    clustered_size,
    decode,
    majority_vote,
    per_text,
    solve,
    wilson_interval,
)
from twistlm.tasks.registry import TASKS, Answers, Task
from twistlm.tools import Tool

USAGE_ERROR = 2
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------- pure functions


def test_majority_vote_counts_parsed_answers_and_breaks_ties_by_first_occurrence():
    assert majority_vote(["3", "4", "4", None, None, None]) == "4"
    assert majority_vote(["5", "3", "3", "5"]) == "5"  # tie: "5" came first
    assert majority_vote([None, "7", "2", "2", "7"]) == "7"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def _result(rows: list[tuple[str, list[str | None]]], samples: int) -> SolveResult:
    problems = [ProblemResult(f"q{i}", gold, [f"c{j}" for j in range(len(a))], a) for i, (gold, a) in enumerate(rows)]
    return SolveResult(problems, samples, 0.5)


def test_accuracy_majority_pass_and_unparsed_on_hand_made_answers():
    res = _result(
        [
            ("4", ["4", "4", "1", None]),  # 2/4 correct, majority 4 ✓, pass ✓, 1 unparsed
            ("2", ["3", "2", "3", "3"]),  # 1/4, majority 3 ✗, pass ✓
            ("9", [None, None, None, None]),  # 0/4, no vote ✗, pass ✗, 4 unparsed
            ("5", ["1", "5", "5", "1"]),  # 2/4, tie 1 vs 5 → 1 (first) ✗, pass ✓
        ],
        samples=4,
    )
    assert res.accuracy.value == pytest.approx(5 / 16)
    assert res.majority_accuracy.value == pytest.approx(1 / 4)
    assert res.pass_at_n.value == pytest.approx(3 / 4)
    assert res.unparsed.value == pytest.approx(5 / 16)
    assert [p.majority for p in res.problems] == ["4", "3", None, "1"]
    for rate in (res.accuracy, res.majority_accuracy, res.pass_at_n, res.unparsed):
        assert 0 <= rate.low <= rate.value <= rate.high <= 1
    assert res.majority_accuracy.n == 4 and res.pass_at_n.n == 4
    assert 4 <= res.accuracy.n <= 16
    summary = res.to_dict()["summary"]
    assert summary["problems"] == 4 and summary["pass_at_n"]["value"] == pytest.approx(0.75)
    json.dumps(res.to_dict(), allow_nan=False)


def test_wilson_interval_known_values():
    low, high = wilson_interval(0.5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(0.0, 20)
    assert low == 0.0 and high == pytest.approx(0.1611, abs=1e-4)
    assert wilson_interval(1.0, 20)[1] == 1.0
    assert wilson_interval(0.3, 0) == (0.0, 1.0)


def test_clustered_size_between_problems_and_samples():
    assert clustered_size([0.5] * 10, 8) == 80  # equal rates: samples count as independent
    assert clustered_size([1.0, 0.0] * 5, 8) == 10  # all-or-nothing problems (e.g. greedy): one trial per problem
    assert clustered_size([1.0] * 10, 8) == 10  # p̂ = 1: v̂ uninformative, conservative n = B
    assert clustered_size([0.25], 8) == 8  # one problem: its own samples
    assert 10 < clustered_size([0.5, 0.25, 0.75, 0.5, 0.375, 0.625, 0.5, 0.5, 0.25, 0.75], 8) <= 80


def test_greedy_samples_count_as_one_per_problem():
    """N identical greedy samples must not narrow the single-sample interval below one trial per problem."""
    res = _result([("1", ["1"] * 10), ("2", ["0"] * 10), ("3", ["3"] * 10), ("4", ["0"] * 10)], samples=10)
    assert res.accuracy.n == 4
    assert (res.accuracy.low, res.accuracy.high) == pytest.approx((res.pass_at_n.low, res.pass_at_n.high))


def test_concatenate_keeps_problem_order():
    a, b = _result([("1", ["1"])], 1), _result([("2", ["3"])], 1)
    both = SolveResult.concatenate([a, b])
    assert [p.gold for p in both.problems] == ["1", "2"] and both.accuracy.value == 0.5


# ---------------------------------------------------------------------------------------------- decoding (toy)


def argmax_path(lm, prompt: str, T: int) -> tuple[list[int], float]:
    """Greedy decoding by hand: argmax of p0 at every step, until EOS or T; its log p0."""
    state = lm.prefill([lm.encode(prompt)], 1)
    path, logp = [], 0.0
    for _ in range(T):
        v = int(state.logprobs[0].argmax())
        path.append(v)
        logp += float(state.logprobs[0, v])
        if v == lm.eos_token_id:
            break
        state = lm.step(state, torch.tensor([v]))
    return path, logp


def potential(texts):
    return [-0.5 * len(t) for t in texts]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("toy_seed", [1, 2, 3])
def test_greedy_proposal_is_the_argmax_path(one_thread, toy_seed, seed):
    lm = twistlm.ToyLM(vocab_size=5, hidden_size=8, seed=toy_seed, eos_bias=0.5)
    prompts = ["a", "bd", "cab"]
    target = twistlm.Target(lm, prompts=prompts, potential=potential, max_new_tokens=5)
    results = twistlm.run_smc(target, 3, proposal="greedy", ess_threshold=0.0, seed=seed)
    for prompt, res in zip(prompts, results):
        path, logp = argmax_path(lm, prompt, 5)
        assert res.token_ids == [path] * 3
        # The greedy weights are log γ(s) = log p0(s) + log φ(s) of the decoded path (not importance weights).
        expected = logp + potential([lm.decode(path)])[0]
        torch.testing.assert_close(res.log_weights, torch.full((3,), expected, dtype=torch.float64))
    texts = decode(target, 4, 0.0, torch.Generator().manual_seed(0))
    assert texts == [[lm.decode(argmax_path(lm, p, 5)[0])] * 4 for p in prompts]


def test_greedy_is_a_decoder_not_an_importance_proposal():
    from twistlm.bounds import Proposal
    from twistlm.smc import DECODERS, PROPOSALS

    assert "greedy" in DECODERS and "greedy" not in PROPOSALS and "tempered" in PROPOSALS
    with pytest.raises(ConfigError, match="greedy"):
        Proposal(kind="greedy")  # bounds need importance weights


def test_low_temperature_approaches_greedy(toy, one_thread):
    target = twistlm.Target(toy, prompts=["a", "bd", "cab"], max_new_tokens=4)
    greedy = decode(target, 6, 0.0, torch.Generator().manual_seed(0))
    cold = decode(target, 6, 1e-3, torch.Generator().manual_seed(0))
    assert cold == greedy


def _toy_target(lm, prompts=("a", "bd", "cab", "dc"), T=4, potential=None, tool=None):
    return twistlm.Target(
        lm, prompts=list(prompts), potential=potential, max_new_tokens=T, extras={"gold": ["a", "b", "c", "d"]},
        tool=tool,
    )


def first_letter(text: str) -> str | None:
    return text[:1] or None


def test_solve_on_the_toy_lm_is_seeded_and_batch_sizes_agree_on_structure(toy, one_thread):
    target = _toy_target(toy)
    golds = target.extras["gold"]
    res = solve(target, per_text(first_letter), golds, samples=5, temperature=0.7, batch=3, seed=4)
    again = solve(target, per_text(first_letter), golds, samples=5, temperature=0.7, batch=3, seed=4)
    assert [p.completions for p in res.problems] == [p.completions for p in again.problems]
    assert len(res.problems) == 4 and all(len(p.answers) == 5 for p in res.problems)
    assert [p.gold for p in res.problems] == golds
    assert [p.prompt for p in res.problems] == target.prompt_texts
    for p in res.problems:
        assert p.answers == [first_letter(c) for c in p.completions]
    progress = []
    solve(target, per_text(first_letter), golds, samples=2, batch=3, callback=lambda d, n: progress.append((d, n)))
    assert progress == [(3, 4), (4, 4)]


def test_solve_never_evaluates_the_potential(toy, one_thread):
    def forbidden(texts):
        raise AssertionError("solve must sample without the answer (φ dropped)")

    target = _toy_target(toy, potential=forbidden)
    res = solve(target, per_text(first_letter), target.extras["gold"], samples=3, temperature=1.0)
    assert res.num_problems == 4


class AfterAForceB(Tool):
    """Toy tool: after every 'a' the completion continues with 'b'."""

    def is_trigger(self, token_text: str) -> bool:
        return token_text == "a"

    def __call__(self, completion: str) -> str | None:
        return "b"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_solve_keeps_the_tool_on(toy, one_thread, temperature):
    target = _toy_target(toy, T=6, tool=AfterAForceB())
    res = solve(target, per_text(first_letter), target.extras["gold"], samples=8, temperature=temperature, seed=1)
    texts = [c for p in res.problems for c in p.completions]
    assert any("a" in t[:-1] for t in texts)
    for t in texts:
        assert all(ch != "a" or nxt == "b" for ch, nxt in zip(t[:-1], t[1:])), t


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": 0}, "samples"),
        ({"samples": 2.5}, "samples"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"batch": 0}, "batch"),
    ],
)
def test_solve_rejects_bad_settings(toy, kwargs, match):
    target = _toy_target(toy)
    with pytest.raises(ConfigError, match=match):
        solve(target, per_text(first_letter), target.extras["gold"], **kwargs)


def test_solve_needs_one_gold_per_problem(toy):
    with pytest.raises(ConfigError, match="golds"):
        solve(_toy_target(toy), per_text(first_letter), ["a"])


# -------------------------------------------------------------------------------------------- task answer hooks


def test_arithmetic_answers_and_golds(shared_data):
    from twistlm.tasks.arithmetic import ANSWERS
    from twistlm.tasks.registry import get_task

    task = get_task("arithmetic")
    assert task.answer is not None
    # Read through the calculator: "6 + 7 = 99, 99 + 1 =" is read as "6 + 7 = 13, 99 + 1 = 100".
    texts = [" 2 + 5 = 7, 7 - 3 = 4. The answer is 4.", " 6 + 7 = 99, 99 + 1 = 5", " no number here", ""]
    assert task.answer.read(None, texts, [0] * 4) == ["4", "100", None, None]
    assert ANSWERS.gold(SimpleNamespace(extras={"solution": [4, -6]})) == ["4", "-6"]
    assert task.answer.count(data=str(shared_data / "arithmetic" / "test_3op.json")) == 500
    assert task.answer.count() == 5  # the built-in problems
    with pytest.raises(ConfigError, match="index"):
        task.answer.count(index=-1)


def test_gsm8k_answers_and_golds():
    from twistlm.tasks.gsm8k import ANSWERS, canonical_number, gsm8k_answer

    assert gsm8k_answer("<reasoning>\n3 * 4 = 12\n</reasoning>\n<answer>\n1,000\n</answer>\n") == "1000"
    assert gsm8k_answer("<answer> $72.0 </answer>") == "72"
    assert gsm8k_answer("<answer>The answer is 12 dollars.</answer>") == "12"
    assert gsm8k_answer("<answer>ten</answer> and then 5") is None  # the tag wins over text after it
    assert gsm8k_answer("so 3 + 4 = 7 apples") == "7"  # no tag: the last number
    assert gsm8k_answer("a 1,2,3 list") == "3"
    assert gsm8k_answer("nothing") is None
    assert canonical_number("-0.0") == "0" and canonical_number("1e3") is None
    golds = ANSWERS.gold(SimpleNamespace(extras={"answer": ["1,080", "#### 7", "-3"]}))
    assert golds == ["1080", "7", "-3"]


def test_subjectivity_golds_are_label_names(shared_data):
    from twistlm.tasks.registry import get_task

    answers = get_task("subjectivity").answer
    assert answers.gold(SimpleNamespace(extras={"label": [0, 1, 1]})) == ["objective", "subjective", "subjective"]
    assert answers.count() == 4
    assert answers.count(data=str(shared_data / "subj" / "train.10.jsonl")) == 10


def test_tasks_without_answers_have_none():
    from twistlm.tasks.registry import answer_tasks, get_task

    assert answer_tasks() == ["arithmetic", "gsm8k", "subjectivity"]
    assert get_task("toxicity").answer is None


# ---------------------------------------------------------------------------------------------------------- CLI


TOY_PROMPTS = ("a", "bd", "cab", "dc", "ba")


@pytest.fixture
def toy_task(monkeypatch):
    """A registered task ``toyqa`` over the toy LM: prompts TOY_PROMPTS[index:], gold = the prompt's first letter,
    answer = the completion's first letter."""

    def build(lm, max_new_tokens=None, num_prompts=1, index=0):
        rows = TOY_PROMPTS[index : index + num_prompts]
        return twistlm.Target(
            lm, prompts=list(rows), max_new_tokens=max_new_tokens or 3, extras={"gold": [p[0] for p in rows]}
        )

    answers = Answers(
        read=per_text(first_letter), gold=lambda target: list(target.extras["gold"]), count=lambda **_: len(TOY_PROMPTS)
    )
    task = Task(name="toyqa", description="toy", build=build, options={"index": "first"}, answer=answers)
    monkeypatch.setitem(TASKS, "toyqa", task)
    return task


@pytest.fixture
def toy_model(monkeypatch):
    lm = twistlm.ToyLM(vocab_size=5, hidden_size=8, seed=1)
    monkeypatch.setattr(solve_cli, "load_model", lambda name: lm)
    return lm


def _no_model(name):
    raise AssertionError("the model must not be loaded for input that can be rejected cheaply")


def test_cli_solves_a_toy_task_and_writes_json(toy_task, toy_model, tmp_path, capsys, one_thread):
    out = tmp_path / "solve.json"
    code = run_app(["solve", "--task", "toyqa", "-o", "index=1", "--limit", "3", "--samples", "4", "-t", "0.5",
                    "--batch", "2", "--json", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    for label in ("problems", "single-sample accuracy", "majority@4", "pass@4", "unparsed"):
        assert label in stdout
    data = json.loads(out.read_text())
    assert data["settings"]["first"] == 1 and data["settings"]["problems"] == 3
    assert [p["prompt"] for p in data["problems"]] == list(TOY_PROMPTS[1:4])
    assert [p["gold"] for p in data["problems"]] == ["b", "c", "d"]
    assert all(len(p["samples"]) == 4 for p in data["problems"])
    s = data["summary"]
    flat = [x for p in data["problems"] for x in p["samples"]]
    assert s["accuracy"]["value"] == pytest.approx(sum(x["correct"] for x in flat) / len(flat))
    assert s["pass_at_n"]["value"] == pytest.approx(sum(p["passed"] for p in data["problems"]) / 3)
    assert s["accuracy"]["low"] <= s["accuracy"]["value"] <= s["accuracy"]["high"]


def test_cli_greedy_defaults_to_every_problem(toy_task, toy_model, tmp_path, capsys, one_thread):
    out = tmp_path / "greedy.json"
    assert run_app(["solve", "--task", "toyqa", "-t", "0", "-n", "3", "-q", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert len(data["problems"]) == len(TOY_PROMPTS)
    for p, prompt in zip(data["problems"], TOY_PROMPTS):
        completions = {x["completion"] for x in p["samples"]}
        assert completions == {toy_model.decode(argmax_path(toy_model, prompt, 3)[0])}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["solve", "--task", "nope"], "unknown task 'nope'"),
        (["solve", "--task", "toxicity"], "task 'toxicity' has no answers to grade; `twistlm solve` works with"),
        (["solve"], "give a task with --task NAME"),
        (["solve", "--task", "arithmetic", "--samples", "0"], "--samples must be at least 1"),
        (["solve", "--task", "arithmetic", "--temperature", "-1"], "--temperature must be a finite number ≥ 0"),
        (["solve", "--task", "arithmetic", "--temperature", "nan"], "--temperature must be a finite number ≥ 0"),
        (["solve", "--task", "arithmetic", "--limit", "0"], "--limit must be at least 1"),
        (["solve", "--task", "arithmetic", "--batch", "0"], "--batch must be at least 1"),
        (["solve", "--task", "arithmetic", "-o", "shots=99"], "shots"),
        (["solve", "--task", "arithmetic", "-o", "colour=red"], "no option 'colour'"),
        (["solve", "--task", "arithmetic", "-o", "index=5"], "index 5 is past the last problem"),
        (["solve", "--task", "arithmetic", "-o", "data=/no/such.json"], "/no/such.json"),
        (["solve", "--task", "arithmetic", "--policy", "/no/such/policy"], "policy folder not found"),
        (["solve", "--task", "arithmetic", "--json", "/no/such/dir/out.json"], "does not exist"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, argv, needle):
    monkeypatch.setattr(solve_cli, "load_model", _no_model)
    code = run_app(argv)
    out, err = capsys.readouterr()
    assert code == USAGE_ERROR, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0]


@pytest.mark.model
def test_cli_solves_two_arithmetic_problems_with_the_embedded_model(shared_data, tmp_path, capsys):
    out = tmp_path / "arith.json"
    data_path = shared_data / "arithmetic" / "test_3op.json"
    argv = ["solve", "--task", "arithmetic", "-o", f"data={data_path}", "--limit", "2", "--samples", "2",
            "-T", "16", "-q", "--json", str(out)]
    code = run_app(argv)
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "majority@2" in stdout
    data = json.loads(out.read_text())
    problems = json.loads(data_path.read_text())[:2]
    assert [p["gold"] for p in data["problems"]] == [str(p["num_sol"]) for p in problems]
    for p in data["problems"]:
        assert len(p["samples"]) == 2
        for x in p["samples"]:
            assert x["answer"] is None or x["answer"].lstrip("-").isdigit()
    assert math.isfinite(data["summary"]["accuracy"]["value"])


@pytest.mark.model
def test_subjectivity_answer_is_the_judged_label(smol):
    from twistlm.tasks.registry import get_task

    task = get_task("subjectivity")
    target = task.build(smol, num_prompts=2)
    texts = [" It states facts about the plot.", " It praises the film with strong opinions."]
    answers = task.answer.read(target, texts, [0, 1])
    assert set(answers) <= {"objective", "subjective"}
    success = task.success(target, texts, [0, 1])
    golds = task.answer.gold(target)
    assert [a == g for a, g in zip(answers, golds)] == success
