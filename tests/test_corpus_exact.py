"""A drawn p0 corpus reused for another potential (rescore) and as the proposals of a rejection sampler (exact σ
samples for evaluation without new p0 draws), on the toy LM.

Exactness: a re-scored corpus is the corpus drawing for the new potential would give; rows accepted by rejection over
a corpus are σ samples (enumerated σ, total variation) and their acceptance rate estimates Z; ``evaluate`` with
``exact="corpus"`` gives upper bounds that sandwich the enumerated log Z with the lower ones.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_positives import HasB
from test_training import SoftLetter

import twistlm
from twistlm import Target
from twistlm.cli import run_app
from twistlm.corpus import build_corpus, load_corpus, rescore_corpus
from twistlm.errors import ConfigError
from twistlm.exact import enumerate_target
from twistlm.rejection import rejection_from_corpus
from twistlm.report import evaluate
from twistlm.tasks.registry import TASKS, Task, register_task

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = "toy-corpus-exact-test"


@pytest.fixture(scope="module")
def lm():
    return twistlm.ToyLM(vocab_size=5, seed=1)


def _target(lm, potential):
    return Target(lm, prompts=["a"], potential=potential, max_new_tokens=3, extras={"label": [1]})


def test_rescored_corpus_equals_the_corpus_drawn_for_the_new_potential(lm, tmp_path):
    soft, hard = _target(lm, SoftLetter()), _target(lm, HasB())
    build_corpus(soft, tmp_path / "soft", 48, seed=4, chunk_particles=16)
    rescored = rescore_corpus(tmp_path / "soft", hard, tmp_path / "hard")
    drawn = build_corpus(hard, tmp_path / "drawn", 48, seed=4, chunk_particles=16)
    for key in ("tokens", "lengths", "prompt_index", "hidden", "log_phi"):
        assert torch.equal(getattr(rescored, key), getattr(drawn, key)), key
    assert load_corpus(tmp_path / "hard", hard).num_rows == 48  # loadable for its new target, refused for the old
    with pytest.raises(ConfigError, match="another potential"):
        load_corpus(tmp_path / "hard", soft)
    other = Target(lm, prompts=["b"], potential=HasB(), max_new_tokens=3)
    with pytest.raises(ConfigError, match="another prompt_ids"):
        rescore_corpus(tmp_path / "soft", other, tmp_path / "other")
    with pytest.raises(ConfigError, match="new folder"):
        rescore_corpus(tmp_path / "soft", hard, tmp_path / "soft")


def test_chunk_ranges_are_the_corpus_rows_they_name(lm, tmp_path):
    target = _target(lm, SoftLetter())
    whole = build_corpus(target, tmp_path / "c", 64, seed=5, chunk_particles=16)
    part = load_corpus(tmp_path / "c", target, chunks=range(1, 3))
    assert torch.equal(part.tokens, whole.tokens[16:48]) and part.info["chunks"] == [1, 3]
    with pytest.raises(ConfigError, match="missing"):
        load_corpus(tmp_path / "c", target, chunks=range(3, 5))
    with pytest.raises(ConfigError, match="not both"):
        load_corpus(tmp_path / "c", target, 16, chunks=range(1))


@pytest.mark.parametrize("potential", [SoftLetter(), HasB()], ids=["soft", "hard"])
def test_rejection_over_a_corpus_gives_sigma_samples_and_z(potential, lm, tmp_path):
    target = _target(lm, potential)
    corpus = build_corpus(target, tmp_path / "c", 6000, seed=6, chunk_particles=1000)
    exact = enumerate_target(target)
    res = rejection_from_corpus(corpus, target, 100_000, seed=1)
    n = len(res.token_ids)
    assert not res.complete and n == res.num_accepted and res.num_proposed == 6000
    assert exact.total_variation(res.token_ids, torch.full((n,), 1.0 / n)) < 0.05
    lo, hi = res.z_ci
    assert lo < math.exp(exact.log_z) < hi
    few = rejection_from_corpus(corpus, target, 10, seed=1)
    assert few.complete and few.token_ids == res.token_ids[:10] and few.z_hat == res.z_hat


def _build(lm, max_new_tokens=None, num_prompts=1):
    return _target(lm, SoftLetter())


@pytest.fixture
def toy_task():
    register_task(Task(TASK, "soft letter toy potential (test)", _build))
    yield
    TASKS.pop(TASK, None)


def test_evaluate_with_exact_samples_from_a_corpus(lm, tmp_path, toy_task):
    target = _target(lm, SoftLetter())
    build_corpus(target, tmp_path / "held-out", 4000, seed=7, chunk_particles=1000)
    pool = load_corpus(tmp_path / "held-out", target, chunks=range(1, 4))
    report = evaluate(target, {"base": "base"}, (1, 4), 150, exact="corpus", exact_corpus=pool, seed=2)
    assert report.exact["num_proposed"] == 3000 and report.exact["corpus"]["chunks"] == [1, 4]
    log_z = enumerate_target(target).log_z
    e = report.bounds.entry("base", 4)
    assert e.lower.mean - 4 * e.lower.stderr <= log_z <= e.upper.mean + 4 * e.upper.stderr
    assert e.upper.n == 150 and math.isfinite(report.kl["base"].kl_sigma_q.mean)
    with pytest.raises(ConfigError, match="exact_corpus"):
        evaluate(target, {"base": "base"}, (1,), 10, exact="corpus")

    out = tmp_path / "out"
    args = ["evaluate", "--task", TASK, "--model", "toy", "--particles", "1,2", "--seeds", "40", "-q"]
    code = run_app([*args, "--out", str(out), "--exact-corpus", str(tmp_path / "held-out"), "--exact-chunks", "0:2"])
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["exact_samples"]["source"] == "corpus" and data["exact_samples"]["num_proposed"] == 2000


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--exact", "corpus"], "--exact corpus needs --exact-corpus"),
        (["--exact-chunks", "0:2"], "give --exact-corpus"),
        (["--exact-corpus", "X", "--exact-chunks", "2"], "A:B"),
        (["--exact-corpus", "X", "--exact-chunks", "3:1"], "0 ≤ A < B"),
        (["--exact-corpus", "X", "--exact", "none"], "cannot be combined"),
    ],
)
def test_evaluate_corpus_options_refused_in_one_line(extra, message, tmp_path, capsys, toy_task):
    code = run_app(["evaluate", "--task", TASK, "--model", "toy", "--out", str(tmp_path / "o"), *extra])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
