"""Infilling Story Cloze and scoring it (``twistlm infill``, :mod:`twistlm.infill_eval`, :mod:`twistlm.text_overlap`),
and the story problem the GFN and SFT policies train on."""

from __future__ import annotations

import json

import pytest

from twistlm.cli.app import USAGE_ERROR, run_app
from twistlm.errors import ConfigError
from twistlm.text_overlap import corpus_bleu, corpus_gleu, gleu_counts, overlap_scores, words

STORIES = "stories/storycloze_val.csv"


def test_gleu_is_the_smaller_of_ngram_precision_and_recall():
    # hypothesis "the cat sat": 6 n-grams (3 + 2 + 1); reference "the cat sat down": 10; all 6 match
    assert gleu_counts("The cat sat", "the cat sat down") == (6, 6, 10)
    assert corpus_gleu(["The cat sat"], ["the cat sat down"]) == pytest.approx(0.6)
    assert corpus_gleu(["a b"], ["c d"]) == 0.0
    assert corpus_gleu(["x y z", "p q"], ["x y z", "p q"]) == pytest.approx(1.0)
    assert words("He's home, now!") == ["he", "'", "s", "home", ",", "now", "!"]


def test_bleu_is_sacrebleus_corpus_bleu_and_intervals_cover_the_value():
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps = ["the cat sat on the mat .", "he went home and slept", "a b c d e", "the dog barked at night"]
    refs = ["the cat sat on a mat .", "she went home early and slept well", "x y z", "the dog barked all night"]
    assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    no_four_gram = (["he went home and slept", "a b c"], ["she went home early and slept well", "a b x"])
    assert corpus_bleu(*no_four_gram) == pytest.approx(sacrebleu.corpus_bleu(no_four_gram[0], [no_four_gram[1]]).score)
    assert corpus_bleu(*no_four_gram) > 0
    scores = overlap_scores(hyps, refs, seed=1)
    again = overlap_scores(hyps, refs, seed=1)
    for name, est in scores.items():
        assert est.low <= est.value <= est.high, name
        assert est == again[name]
    assert overlap_scores(refs, refs)["similarity"].value == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ConfigError, match="2 hypotheses for 1 references"):
        overlap_scores(["a", "b"], ["a"])


@pytest.mark.model
def test_the_story_problem_reads_the_ending_and_labels_true_sentences(smol, shared_data):
    from twistlm.gfn.problems import STORY_RECIPE, build_problem, stop_token

    problem = build_problem("infilling", smol, data=str(shared_data / STORIES), prompts=20)
    assert problem.condition == "observation" and problem.space.stop_ids == (stop_token(smol),)
    assert problem.config == STORY_RECIPE
    assert 15 <= len(problem.given) <= 20
    for i, g in problem.given.items():
        text = smol.decode(g.tokens + [g.stop_token]).strip()
        assert text == problem.target.extras["middle"][i].strip()
        assert not any(problem.space.is_stop[t] for t in g.tokens)
    other_stops = [t for t in problem.target.stop_ids if t != stop_token(smol)]
    assert not bool(problem.space.allowed[other_stops].any())


@pytest.mark.model
def test_the_bdmc_problem_is_amortized_over_endings_with_exact_length_spans(smol):
    from twistlm.gfn.problems import EXACT_SPAN_RECIPE, build_problem

    problem = build_problem("infilling", smol, prompts=3)
    T = problem.target.max_new_tokens
    assert (problem.space.min_len, problem.space.max_len) == (T, T)
    assert problem.condition == "observation" and problem.config == EXACT_SPAN_RECIPE
    endings = problem.target.extras["observation"]
    assert len({tuple(o) for o in endings}) == 3  # three draws, three endings


@pytest.mark.model
def test_cli_infill_scores_every_method_on_the_same_stories(tmp_path, shared_data, capsys):
    out = tmp_path / "infill.json"
    code = run_app(["infill", "--data", str(shared_data / STORIES), "--index", "1000", "--limit", "2", "-K", "2",
                    "-T", "8", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    assert [m["name"] for m in data["methods"]] == ["p0", "prompt", "smc"]
    assert len(data["references"]) == 2 and all(len(m["texts"]) == 2 for m in data["methods"])
    for m in data["methods"]:
        assert set(m["scores"]) == {"bleu", "gleu", "similarity"}
    assert "GLEU" in capsys.readouterr().out
    alone = tmp_path / "smc.json"  # each method has its own random stream: dropping the others changes nothing
    assert run_app(["infill", "--data", str(shared_data / STORIES), "--index", "1000", "--limit", "2", "-K", "2",
                    "-T", "8", "--methods", "smc", "--json", str(alone), "-q"]) == 0
    assert json.loads(alone.read_text())["methods"][0]["texts"] == data["methods"][2]["texts"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--methods", "p0,magic"], "unknown infill method 'magic'"),
        (["--index", "1570", "--limit", "5"], "exceeds the 1571 stories"),
        (["--policy", "/nonexistent/policy"], "policy folder not found"),
    ],
)
def test_cli_infill_bad_input_is_one_line(shared_data, capsys, args, message, monkeypatch):
    import twistlm.cli.infill as cli

    monkeypatch.setattr(cli, "load_model", lambda name: pytest.fail("loaded a model before checking the input"))
    code = run_app(["infill", "--data", str(shared_data / STORIES), *args])
    err = capsys.readouterr().err
    assert code == USAGE_ERROR and message in err and "Traceback" not in err


def test_cli_infill_missing_data_file(capsys, tmp_path):
    assert run_app(["infill", "--data", str(tmp_path / "none.csv")]) == USAGE_ERROR
    assert "no such file" in capsys.readouterr().err
