"""``twistlm.search`` and ``twistlm search``: equal token budgets, what each method returns, the metrics, the API and
CLI agreeing, JSON output, one-line errors. The toy LM throughout; one smoke test (marked ``model``) runs the gsm8k
task on the embedded model with a tiny budget, and one checks a too-long question there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import twistlm
from twistlm import enumerate_target
from twistlm.cli import run_app
from twistlm.cli import search as search_cli
from twistlm.errors import ConfigError
from twistlm.exact import OptimalTwist
from twistlm.potentials.base import Potential
from twistlm.prompt_data import PromptDataset
from twistlm.search import METHODS, SELECTORS, particles_for, search
from twistlm.tasks.registry import TASKS, Task
from twistlm.twists.io import save_twist
from twistlm.twists.linear import LinearTwist
from twistlm.twists.tabular import TabularTwist

USAGE_ERROR = 2
T = 3
pytestmark = pytest.mark.usefixtures("one_thread")


class HasLetter(Potential):
    """φ(s) = 1[letter (1 + label) in s]: an indicator, so 'correct' = φ > 0."""

    name = "has-letter"
    bounded = True

    def log_phi(self, seqs):
        return torch.tensor(
            [0.0 if (1 + lab) in ids else -math.inf for ids, lab in zip(seqs.token_ids, seqs.extras["label"])],
            dtype=torch.float64,
        )


ROWS = [{"prompt": p, "answer": str(lab), "label": lab} for p, lab in [("a", 0), ("b", 1), ("c", 2), ("ab", 2),
                                                                      ("ca", 0), ("d", 1)]]


@pytest.fixture(scope="module")
def lm():
    return twistlm.ToyLM(vocab_size=5, seed=1)


@pytest.fixture(scope="module")
def target(lm):
    return PromptDataset.from_rows(ROWS).as_target(lm, HasLetter(), T)


def starts_with_a(target, texts, prompt_index):
    return [t.startswith("a") for t in texts]


# ------------------------------------------------------------------------------------------------------------ API


@pytest.mark.parametrize("budget", [T, 7, 16])
def test_every_method_stays_within_the_budget(lm, target, budget):
    twist = LinearTwist.for_lm(lm, init_scale=0.5, seed=0)
    result = search(target, budget, twist=twist, batch=4, formatted=starts_with_a)
    K = budget // T
    assert result.particles == K and set(result.methods) == set(METHODS)
    for m in result.methods.values():
        assert len(m.questions) == len(ROWS) and m.particles == K
        assert all(1 <= q.tokens <= budget for q in m.questions)
        assert m.max_tokens <= K * T <= budget
        for rate in (m.solved, m.found, m.format_rate):
            assert 0 <= rate.low <= rate.value <= rate.high <= 1 and rate.n == len(ROWS)
        assert m.found.value >= m.solved.value
        assert m.wall_s > 0
    json.dumps(result.to_dict(), allow_nan=False)


def test_best_of_n_tokens_are_the_completions_lengths_and_it_returns_the_best(lm, target):
    """Without resampling the particles are the N draws: tokens = Σ lengths (EOS included, nothing after it), and
    the returned draw is correct whenever any draw is."""
    from twistlm.smc import run_smc

    result = search(target, 8 * T, methods=["best-of-n"], batch=None, seed=3)
    m = result.methods["best-of-n"]
    assert m.select == "reward"
    gen = torch.Generator().manual_seed(3)  # best-of-n's generator: seed + stride · 0
    runs = run_smc(target, 8, proposal="base", ess_threshold=0.0, generator=gen)
    for q, run in zip(m.questions, runs):
        assert q.tokens == sum(len(ids) for ids in run.token_ids)
        assert q.found == bool((run.log_phi > -math.inf).any()) and q.correct == q.found
        assert q.reward == (1.0 if q.correct else 0.0)  # φ of the returned draw
    assert m.mean_reward == pytest.approx(m.solved.value)


def test_seeded_and_methods_do_not_change_each_others_draws(lm, target):
    twist = LinearTwist.for_lm(lm, init_scale=0.5, seed=0)
    both = search(target, 4 * T, twist=twist, seed=1)
    alone = search(target, 4 * T, methods=["smc"], seed=1)
    again = search(target, 4 * T, twist=twist, seed=1)
    assert [q.to_dict() for q in both.methods["smc"].questions] == [q.to_dict() for q in alone.methods["smc"].questions]
    assert both.methods["twisted-smc"].summary()["solved"] == again.methods["twisted-smc"].summary()["solved"]
    assert [q.text for q in both.methods["best-of-n"].questions] == [q.text for q in again.methods["best-of-n"].questions]


def test_twisted_smc_with_the_optimal_twist_solves_every_question(lm, target):
    """With ψ* the proposal is σ itself, so every particle satisfies the indicator: solved = found = 100%."""
    result = search(target, 2 * T, twist=_optimal_per_prompt(target), methods=["twisted-smc"], batch=None)
    m = result.methods["twisted-smc"]
    assert m.solved.value == 1.0 and m.found.value == 1.0 and m.mean_reward == 1.0


def _optimal_per_prompt(target):
    """A per-prompt tabular twist holding each prompt's optimal ψ*."""
    twist = TabularTwist.for_target(target, per_prompt=True)
    with torch.no_grad():
        for b in range(target.num_prompts):
            exact = enumerate_target(target, b)
            assert exact.log_z > -math.inf
            optimal = TabularTwist.from_optimal(OptimalTwist(exact, target.lm.vocab_size), target)
            twist.table[b].copy_(optimal.table[0])
    return twist


@pytest.mark.parametrize("select", list(SELECTORS))
def test_every_selection_returns_one_of_the_final_particles(lm, target, select):
    result = search(target, 4 * T, methods=["smc"], select=select, batch=2)
    m = result.methods["smc"]
    assert m.select == select
    if select == "reward":
        assert [q.correct for q in m.questions] == [q.found for q in m.questions]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"budget": T - 1}, "below the horizon T = 3"),
        ({"budget": 0}, "positive integer"),
        ({"methods": ["beam"]}, "unknown search method 'beam'"),
        ({"methods": ["twisted-smc"]}, "needs a trained twist"),
        ({"methods": []}, "at least one"),
        ({"select": "best"}, "unknown selection 'best'"),
        ({"ess_threshold": 2.0}, "κ must lie in [0, 1]"),
        ({"batch": 0}, "batch must be a positive integer"),
        ({"resampler": "nope"}, "nope"),
    ],
)
def test_bad_settings_are_one_line(target, kwargs, needle):
    kwargs = {"budget": 2 * T, **kwargs}
    with pytest.raises(ConfigError) as exc:
        search(target, kwargs.pop("budget"), **kwargs)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_particles_for_the_budget():
    assert particles_for(256 * 16, 256) == 16 and particles_for(300, 256) == 1
    with pytest.raises(ConfigError):
        particles_for(255, 256)


# ------------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def toy_search_task(monkeypatch):
    """Task ``toy-search``: ROWS as a dataset with a dev split (the last 2 rows), φ = HasLetter, T = 3."""

    def data(index=0, part="all", dev_size=2, data=None):
        return PromptDataset.from_rows(ROWS, source="toy rows").part(part, dev_size).slice(index)

    def build(lm, max_new_tokens=None, num_prompts=1, **options):
        return data(**options).slice(0, num_prompts).as_target(lm, HasLetter(), max_new_tokens or T)

    def success(target, texts, prompt_index):
        return [lp > -math.inf for lp in target.potential(target.sequences(
            [target.lm.encode(t) for t in texts], prompt_index)).tolist()]

    options = {"data": "unused", "index": "first row", "part": "all|train|dev", "dev_size": "dev rows"}
    task = Task("toy-search", "rows", build, success=success, options=options, dataset=data,
                formatted=starts_with_a)
    monkeypatch.setitem(TASKS, "toy-search", task)
    return task


def test_cli_and_api_agree_and_json_is_written(toy_search_task, lm, tmp_path, capsys):
    twist_dir = tmp_path / "tw"
    twist = LinearTwist.for_lm(lm, init_scale=0.5, seed=0)
    save_twist(twist, twist_dir, lm.name, task="toy-search")
    out = tmp_path / "search.json"
    code = run_app(["search", "--task", "toy-search", "--model", "toy", "-o", "part=all", "--limit", "5",
                    "--tokens", "9", "--twist", str(twist_dir), "--batch", "2", "--seed", "4", "--json", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    for label in ("solved (returned)", "found (any particle)", "mean reward", "format", "tokens / question",
                  "best-of-n", "twisted-smc"):
        assert label in stdout
    data = json.loads(out.read_text())
    assert data["settings"]["questions"] == 5 and data["settings"]["particles"] == 3
    assert data["settings"]["methods"] == ["best-of-n", "smc", "twisted-smc"]

    loaded = twistlm.twists.io.load_twist(twist_dir, lm)
    target = toy_search_task.build(lm, num_prompts=5)
    api = search(target, 9, twist=loaded, batch=2, seed=4, success=toy_search_task.success, formatted=starts_with_a)
    for name, m in api.methods.items():
        mine, theirs = m.to_dict(), data["methods"][name]
        mine["summary"].pop("wall_s"), theirs["summary"].pop("wall_s")
        assert mine == theirs
        assert all(q["tokens"] <= 9 for q in theirs["questions"])


def test_cli_defaults_to_the_dev_part(toy_search_task, tmp_path, capsys):
    out = tmp_path / "dev.json"
    assert run_app(["search", "--task", "toy-search", "--model", "toy", "-o", "data=rows", "--tokens", "6",
                    "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["settings"]["task_options"]["part"] == "dev" and data["settings"]["questions"] == 2
    assert "rows 5–6 of toy rows" in stdout
    assert [q["prompt"] for q in data["methods"]["smc"]["questions"]] == ["ca", "d"]


def _no_model(name):
    raise AssertionError("the model must not be loaded for input that can be rejected cheaply")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--tokens", "0"], "--tokens must be at least 1"),
        (["--tokens", "64", "-T", "128"], "below the horizon T = 128"),
        (["--tokens", "256", "--methods", "beam"], "unknown search method 'beam'"),
        (["--tokens", "256", "--methods", "twisted-smc"], "needs --twist DIR"),
        (["--tokens", "256", "--select", "best"], "unknown --select 'best'"),
        (["--tokens", "256", "--limit", "0"], "--limit must be at least 1"),
        (["--tokens", "256", "--ess-threshold", "2"], "--ess-threshold must lie in [0, 1]"),
        (["--tokens", "256", "--twist", "/no/such/twist"], "twist directory not found"),
        (["--tokens", "256", "--json", "/no/such/dir/out.json"], "does not exist"),
        (["--tokens", "256", "-o", "colour=red"], "no option 'colour'"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, argv, needle):
    monkeypatch.setattr(search_cli, "load_model", _no_model)
    code = run_app(["search", "--task", "gsm8k", *argv])
    out, err = capsys.readouterr()
    assert code == USAGE_ERROR, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def test_cli_bad_data_is_one_line_before_the_model(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(search_cli, "load_model", _no_model)
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, needle in [(no_answer, "line 2: missing field 'answer'"), (empty, "empty.jsonl is empty")]:
        code = run_app(["search", "--task", "gsm8k", "-o", f"data={path}", "--tokens", "256"])
        err = capsys.readouterr().err.strip()
        assert code == USAGE_ERROR and len(err.splitlines()) == 1 and needle in err, err


# ------------------------------------------------------------------------------------------ embedded model (smoke)


def _gsm8k_file(path: Path, questions: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(questions)))
    return path


@pytest.mark.model
def test_cli_search_gsm8k_on_the_embedded_model(tmp_path, capsys):
    """Two dev questions, T = 8, B = 16 (N = K = 2), all three methods with an untrained twist (ψ ≡ 1)."""
    import time

    data = _gsm8k_file(tmp_path / "gsm.jsonl", [f"Tom has {i} apples and buys {i} more. How many now?" for i in range(4)])
    start = time.perf_counter()
    lm = twistlm.load_lm()
    save_twist(LinearTwist.for_lm(lm), tmp_path / "tw", lm.name, task="gsm8k")
    out = tmp_path / "s.json"
    argv = ["search", "--task", "gsm8k", "-o", f"data={data}", "-o", "dev_size=2", "--limit", "2", "--tokens", "16",
            "-T", "8", "--twist", str(tmp_path / "tw"), "-q", "--json", str(out)]
    assert run_app(argv) == 0, capsys.readouterr().err
    elapsed = time.perf_counter() - start
    result = json.loads(out.read_text())
    assert result["settings"]["source"].startswith("rows 3–4 of")
    for name in METHODS:
        summary = result["summary"][name]
        assert summary["questions"] == 2 and summary["max_tokens_per_question"] <= 16
        assert 0.0 <= summary["mean_reward"] <= 4.0 and summary["format"] is not None
    assert elapsed < 20, f"smoke run took {elapsed:.1f} s"


@pytest.mark.model
def test_cli_search_refuses_a_question_longer_than_the_context(tmp_path, capsys):
    long = " ".join(["apples"] * 9000) + "?"
    data = _gsm8k_file(tmp_path / "long.jsonl", ["How many?", long])
    code = run_app(["search", "--task", "gsm8k", "-o", f"data={data}", "-o", "part=all", "--tokens", "8", "-T", "8",
                    "-q"])
    err = capsys.readouterr().err.strip()
    assert code == USAGE_ERROR and len(err.splitlines()) == 1, err
    assert "row 2: the prompt has" in err and "exceeds the model's context of 8192 tokens" in err
