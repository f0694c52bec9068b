"""The ``twistlm sample`` and ``twistlm tasks`` commands.

Most tests run the CLI in-process with :func:`twistlm.cli.run_app`. Bad input must be rejected before any model is
loaded, so those tests replace the model loader with one that fails; the machinery tests swap in the toy LM. Tests
marked ``model`` use the embedded SmolLM2 (one of them through a real ``python -m twistlm`` subprocess).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import twistlm
from twistlm.cli import common, run_app
from twistlm.cli import sample as sample_cli
from twistlm.cli.common import parse_options, write_json
from twistlm.potentials import ContainsPotential
from twistlm.tasks.registry import TASKS, Task

USAGE_ERROR = 2
CONTEXT_OVERFLOW_TOKENS = 9000  # more than SmolLM2's 8192-token context
SUBPROCESS_TIMEOUT_S = 300


def _no_model(name):
    raise AssertionError("the model must not be loaded for input that can be rejected cheaply")


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(sample_cli, "load_model", _no_model)


@pytest.fixture
def toy_model(monkeypatch):
    """Every CLI model load returns a small toy LM (letters a–d + EOS)."""
    lm = twistlm.ToyLM(vocab_size=5, hidden_size=8, seed=1)
    monkeypatch.setattr(sample_cli, "load_model", lambda name: lm)
    return lm


@pytest.fixture
def fake_task(monkeypatch):
    """A registered task ``fake`` over any LM: prompt "ab", φ = 1[LETTER in s], default horizon 3."""

    def build(lm, max_new_tokens=None, num_prompts=1, letter="a"):
        return twistlm.Target(lm, prompt="ab", potential=ContainsPotential(letter), max_new_tokens=max_new_tokens or 3)

    task = Task(name="fake", description="a test task", build=build, options={"letter": "letter to contain"})
    monkeypatch.setitem(TASKS, "fake", task)
    return task


def _error_line(capsys, argv: list[str]) -> str:
    """Run argv, expect exit code 2, and return the single error line."""
    code = run_app(argv)
    out, err = capsys.readouterr()
    assert code == USAGE_ERROR, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


# -------------------------------------------------------------------------------------------------- bad input


BASE = ["sample", "--prompt", "Once upon a time"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["-K", "0"], "--particles must be at least 1"),
        (["-T", "0"], "--max-new-tokens must be at least 1"),
        (["--ess-threshold", "1.5"], "κ must lie in [0, 1]"),
        (["--ess-threshold", "-0.1"], "κ must lie in [0, 1]"),
        (["--resampler", "bogus"], "unknown resampler 'bogus'"),
        (["--potential", "bogus:1"], "unknown potential 'bogus'"),
        (["--potential", "regex:("], "bad regular expression"),
        (["--proposal", "greedy"], "unknown proposal 'greedy'"),
        (["--proposal", "twisted"], "--proposal twisted needs a trained twist"),
        (["--twist", "/nonexistent/twist"], "twist directory not found"),
        (["--model", "/nonexistent/model"], "model path not found"),
        (["--model", "/nonexistent/model.gguf"], "GGUF file not found"),
        (["--task", "no-such-task"], "--task supplies the prompt"),
        (["--task-option", "a=1"], "--task-option needs --task"),
        (["--top", "0"], "--top must be at least 1"),
        (["--json", "/nonexistent/dir/out.json"], "does not exist"),
        (["-K", "many"], "--particles"),
        (["--bogus"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, no_model, extra, needle):
    assert needle in _error_line(capsys, BASE + extra)


def test_prompt_sources(capsys, no_model, tmp_path):
    assert "give a prompt" in _error_line(capsys, ["sample"])
    missing = tmp_path / "missing.txt"
    assert "prompt file not found" in _error_line(capsys, ["sample", "--prompt-file", str(missing)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "prompt file is empty" in _error_line(capsys, ["sample", "--prompt-file", str(empty)])
    both = ["sample", "--prompt", "x", "--prompt-file", str(empty)]
    assert "not both" in _error_line(capsys, both)


def test_twist_dir_without_config_or_of_unknown_kind(capsys, no_model, tmp_path):
    line = _error_line(capsys, BASE + ["--proposal", "twisted", "--twist", str(tmp_path)])
    assert "no twist found" in line
    (tmp_path / "twist_config.json").write_text('{"kind": "bogus"}')
    assert "'bogus'" in _error_line(capsys, BASE + ["--twist", str(tmp_path)])


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--task", "toxicity", "--proposal", "twisted"],
        ["evaluate", "--task", "toxicity", "--out", "/tmp/never-written"],
        ["search", "--task", "gsm8k", "--tokens", "512"],
    ],
    ids=["sample", "evaluate", "search"],
)
def test_a_twist_trained_for_another_task_is_refused_before_loading(capsys, no_model, tmp_path, argv):
    (tmp_path / "twist_config.json").write_text('{"kind": "linear", "task": "sentiment"}')
    line = _error_line(capsys, argv + ["--twist", str(tmp_path)])
    assert "trained for task 'sentiment'" in line and "not '" in line


def test_unknown_task(capsys, no_model):
    assert "unknown task 'no-such-task'" in _error_line(capsys, ["sample", "--task", "no-such-task"])


def test_task_options_checked_before_loading(capsys, no_model, fake_task):
    assert "has no option 'nope'" in _error_line(capsys, ["sample", "--task", "fake", "-o", "nope=1"])
    assert "bad option" in _error_line(capsys, ["sample", "--task", "fake", "-o", "letter"])
    assert "--max-new-tokens" in _error_line(capsys, ["sample", "--task", "fake", "-o", "max_new_tokens=3"])
    clash = _error_line(capsys, ["sample", "--task", "fake", "--potential", "none", "--chat"])
    assert "drop --potential, --chat" in clash


# -------------------------------------------------------------------------------------- machinery (toy LM)


def test_sample_on_toy_lm_writes_json(capsys, toy_model, tmp_path):
    out_path = tmp_path / "out.json"
    argv = ["sample", "--prompt", "ab", "--potential", "contains:a", "-K", "8", "-T", "3", "--json", str(out_path)]
    assert run_app(argv) == 0
    out = capsys.readouterr().out
    data = _read(out_path)
    weights = [p["weight"] for p in data["particles"]]
    assert len(weights) == 8 and math.isclose(sum(weights), 1.0, rel_tol=1e-9)
    assert all(("a" in p["text"]) == (p["weight"] > 0) for p in data["particles"])
    assert data["settings"]["particles"] == 8 and data["settings"]["potential"] == "contains:a"
    assert f"{data['log_z']:.4f}" in out
    assert "Samples from σ" in out and "ESS" in out
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temporary file"


def test_all_weights_zero_is_ok_with_a_hint(capsys, toy_model, tmp_path):
    out_path = tmp_path / "dead.json"
    assert (
        run_app(
            ["sample", "--prompt", "ab", "--potential", "contains:zzz", "-K", "4", "-T", "2", "--json", str(out_path)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "every particle has weight zero" in out and "hint" in out
    assert _read(out_path)["log_z"] is None


def test_task_supplies_prompt_and_potential(capsys, toy_model, fake_task, tmp_path):
    out_path = tmp_path / "task.json"
    assert run_app(["sample", "--task", "fake", "-o", "letter=b", "-K", "4", "--json", str(out_path), "-q"]) == 0
    data = _read(out_path)
    assert data["prompt"] == "ab" and data["potential"] == "contains:b"
    assert data["settings"]["task_options"] == {"letter": "b"}
    assert data["settings"]["max_new_tokens"] == 3  # the task's default horizon
    assert all(len(p["token_ids"]) <= 3 for p in data["particles"])


def test_tasks_command(capsys, fake_task):
    assert run_app(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "fake" in out and "a test task" in out and "letter" in out


def test_parse_options_and_json_helpers(tmp_path):
    assert parse_options(["n=3", "x=0.5", "flag=true", "name=bob", "eq=a=b"]) == {
        "n": 3,
        "x": 0.5,
        "flag": True,
        "name": "bob",
        "eq": "a=b",
    }
    path = tmp_path / "x.json"
    write_json(path, {"a": float("-inf"), "b": [1.0, float("nan")]})
    assert _read(path) == {"a": None, "b": [1.0, None]}
    assert sample_cli._ranges([1, 2, 3, 7, 9, 10]) == "1–3, 7, 9–10"
    assert sample_cli._sparkline([4.0, 2.0, 0.0], 4.0) == "█▅▁"
    assert sample_cli._exp_text(-1.0) == "0.368" and sample_cli._exp_text(-1000.0) == "e^-1000.0"


# ------------------------------------------------------------------------------------- the embedded model


@pytest.fixture
def cached_smol(smol, monkeypatch, one_thread):
    """The CLI's model cache pre-filled with the session's embedded model (no second load)."""
    monkeypatch.setitem(common._MODEL_CACHE, None, smol)
    return smol


@pytest.mark.model
def test_prompt_too_long(capsys, cached_smol):
    line = _error_line(capsys, BASE + ["-T", str(CONTEXT_OVERFLOW_TOKENS)])
    assert "exceeds the model's context" in line


@pytest.mark.model
def test_real_sample_json_is_valid_and_deterministic(capsys, cached_smol, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    argv = BASE + ["--potential", "contains:e", "-K", "4", "-T", "6", "--seed", "3", "--ess-threshold", "0"]
    assert run_app(argv + ["--json", str(first)]) == 0
    assert run_app(argv + ["--json", str(second), "--quiet"]) == 0
    assert first.read_bytes() == second.read_bytes()
    data = _read(first)
    particles = data["particles"]
    assert len(particles) == 4
    assert math.isclose(sum(p["weight"] for p in particles), 1.0, rel_tol=1e-9)
    assert all(("e" in p["text"]) == (p["weight"] > 0) for p in particles)
    # κ = 0 is SIS: log Ẑ = logsumexp_k W^k − log K, from the written log weights alone.
    log_w = torch.tensor(
        [p["log_weight"] if p["log_weight"] is not None else -math.inf for p in particles], dtype=torch.float64
    )
    assert data["log_z"] == pytest.approx(float(torch.logsumexp(log_w, 0)) - math.log(4), abs=1e-9)
    assert f"{data['log_z']:.4f}" in capsys.readouterr().out


@pytest.mark.model
def test_twisted_proposal_with_saved_linear_twist(capsys, cached_smol, tmp_path):
    twist_dir, out_path = tmp_path / "twist", tmp_path / "tw.json"
    twistlm.LinearTwist.for_lm(cached_smol, init_scale=0.01).save_pretrained(twist_dir)
    argv = BASE + ["-K", "4", "-T", "6", "--proposal", "twisted", "--twist", str(twist_dir), "--json", str(out_path)]
    assert run_app(argv) == 0, capsys.readouterr().err
    data = _read(out_path)
    assert data["settings"]["proposal"] == "twisted"
    assert math.isclose(sum(p["weight"] for p in data["particles"]), 1.0, rel_tol=1e-9)
    assert data["log_z"] is not None and math.isfinite(data["log_z"])


@pytest.mark.model
def test_end_to_end_subprocess(smol, tmp_path):
    """``python -m twistlm sample --chat`` in a fresh process: exit 0, valid JSON, no transformers progress bars."""
    out_path = tmp_path / "e2e.json"
    cmd = [sys.executable, "-m", "twistlm", "sample", "--prompt", "The sky is", "--chat", "-K", "2", "-T", "3"]
    proc = subprocess.run(
        cmd + ["--json", str(out_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        env={**os.environ, "COLUMNS": "120", "OMP_NUM_THREADS": "1"},  # see one_thread
    )
    assert proc.returncode == 0, proc.stderr
    assert "Loading weights" not in proc.stderr and "Traceback" not in proc.stderr
    assert "log Ẑ" in proc.stdout
    data = _read(out_path)
    assert data["settings"]["prompt"] == [{"role": "user", "content": "The sky is"}]
    assert "The sky is" in data["prompt"] and data["prompt"] != "The sky is"  # rendered through the chat template
    assert len(data["particles"]) == 2 and data["log_z"] == pytest.approx(0.0, abs=1e-9)  # φ ≡ 1 ⇒ Ẑ = 1
    assert torch.tensor([p["weight"] for p in data["particles"]]).sum().item() == pytest.approx(1.0)
