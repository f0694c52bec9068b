"""The built-in tasks: registry, option checking, data, metrics (calculator), stop tokens, and end-to-end sampling.

Model tests run each task on the embedded SmolLM2 with K = 4 particles and a short horizon, with its defaults and
with data from ../shared/data. Under CPU contention two BLAS threads are far slower than one, so those tests run
single-threaded (restored afterwards).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from twistlm import run_smc
from twistlm.errors import ConfigError, DataError
from twistlm.potentials import Sequences
from twistlm.tasks import TASKS, get_task
from twistlm.tasks.arithmetic import ArithmeticPotential, arithmetic_answer, calculator_text, is_correct
from twistlm.tasks.common import ends_sentence, newline_token_ids, sentence_end_token_ids
from twistlm.tasks.infilling import exact_samples

ALL_TASKS = ("toxicity", "sentiment", "infilling", "tempered", "arithmetic", "subjectivity", "gsm8k")
BINARY_GOAL = {"toxicity", "sentiment", "arithmetic", "subjectivity", "gsm8k"}
K = 4
SHORT_T = 4

DATA_OPTIONS = {
    "infilling": {"data": "stories/storycloze_val.csv"},
    "tempered": {"data": "prompts/openwebtext.txt"},
    "arithmetic": {"data": "arithmetic/test_3op.json"},
    "subjectivity": {"data": "subj/train.10.jsonl"},
    "gsm8k": {"data": "gsm8k/train.jsonl"},
}


# ------------------------------------------------------------------------------------------------ registry, options


def test_every_task_is_registered_with_options_in_its_signature():
    for name in ALL_TASKS:
        task = get_task(name)
        assert task.name == name and task.description
        params = inspect.signature(task.build).parameters
        assert list(params)[:3] == ["lm", "max_new_tokens", "num_prompts"]
        assert set(task.options) == set(list(params)[3:])  # the CLI checks option names from the signature
        assert (task.success is not None) == (name in BINARY_GOAL)
    assert set(ALL_TASKS) <= set(TASKS)


def test_unknown_task_names_the_choices():
    with pytest.raises(ConfigError, match="unknown task 'nope'.*toxicity"):
        get_task("nope")


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"task 'toxicity' has no option 'etaa'; its options: form, eta, beta"):
        get_task("toxicity").build(None, etaa=0.3)


@pytest.mark.parametrize(
    ("task", "options", "message"),
    [
        ("sentiment", {"rating": 7}, r"option 'rating' must be one of 1, 2, 3, 4, 5"),
        ("sentiment", {"rating": "one"}, r"option 'rating' must be an integer"),
        ("tempered", {"tau": 0}, r"option 'tau' must be > 0"),
        ("toxicity", {"form": "soft"}, r"option 'form' must be one of threshold, tempered"),
        ("toxicity", {"eta": 1.5}, r"option 'eta' must be ≤ 1"),
        ("arithmetic", {"index": -1}, r"option 'index' must be ≥ 0"),
        ("arithmetic", {"shots": 99}, r"option 'shots' must be ≤"),
    ],
)
def test_bad_option_values_are_config_errors(task, options, message):
    with pytest.raises(ConfigError, match=message):
        get_task(task).build(None, **options)


def test_bad_horizon_and_num_prompts(toy):
    with pytest.raises(ConfigError, match="max_new_tokens"):
        get_task("sentiment").build(toy, max_new_tokens=0)
    with pytest.raises(ConfigError, match="num_prompts"):
        get_task("sentiment").build(toy, num_prompts=0)


@pytest.mark.parametrize("task", sorted(DATA_OPTIONS))
def test_missing_data_path_is_a_data_error_naming_it(task, toy, tmp_path):
    missing = tmp_path / "absent.file"
    with pytest.raises(DataError, match="absent.file"):
        get_task(task).build(toy, data=str(missing))


def test_index_past_the_end_is_a_config_error(toy, shared_data):
    with pytest.raises(ConfigError, match="index 9 with num_prompts 2 needs 11 examples.*has 10"):
        get_task("subjectivity").build(toy, data=str(shared_data / "subj/train.10.jsonl"), index=9, num_prompts=2)
    with pytest.raises(ConfigError, match="built-in problem list has 5"):
        get_task("arithmetic").build(toy, index=5)


# ------------------------------------------------------------------------------------------- calculator, metrics


def test_calculator_splices_values_into_completions():
    assert calculator_text(" 3 + 4 = 7, 7 - 2 = 5. The answer is 5") == " 3 + 4 = 7, 7 - 2 = 5. The answer is 5"
    # the tool's value replaces the model's (wrong) one; later steps stand as written
    assert calculator_text(" 3 + 4 = 8, 8 - 2 = 6.") == " 3 + 4 = 7, 8 - 2 = 6."
    # the data's rationale style: "expr =," with no value at all
    assert calculator_text(" 6 - 0 =, 6 - 4 =, 2 - 8 =.") == " 6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6."
    assert calculator_text(" 8 - 9 = 1, -1 + 4 = 3") == " 8 - 9 = -1, -1 + 4 = 3"
    assert calculator_text("no = expression") == "no = expression"


@pytest.mark.parametrize(
    ("completion", "solution", "correct"),
    [
        (" 3 + 4 = 7, 7 - 2 = 5. The answer is 5", 5, True),
        (" 3 + 4 = 7, 7 - 2 = 5. The answer is 5.\nQuestion: 1 + 1 = ? Answer:", 5, True),
        (" 3 + 4 = 8, 8 - 2 = 6. The answer is 6.", 5, False),
        (" 3 + 4 =, 7 - 2 =", 5, True),  # no "answer is": the last value, computed by the calculator
        (" 3 + 4 = 7, 7 - 2 = 4", 5, True),  # the calculator overrides the model's arithmetic
        (" 4 - 6 = -2, -2 - 1 = -3. The answer is -3.", -3, True),
        (" I don't know.", 5, False),
    ],
)
def test_arithmetic_answer_through_the_calculator(completion, solution, correct):
    assert is_correct(completion, solution) is correct


def test_arithmetic_potential_exact_and_soft():
    texts = [" 3 + 4 = 7, 7 - 2 = 5. The answer is 5.", " The answer is 8.", " no idea"]
    seqs = Sequences(prompts=["q"] * 3, texts=texts, token_ids=[[1]] * 3, extras={"solution": [5, 5, 5]})
    assert ArithmeticPotential("exact")(seqs).tolist() == [0.0, -math.inf, -math.inf]
    assert ArithmeticPotential("soft", beta=0.5)(seqs).tolist() == [0.0, -1.5, -5.0]
    assert arithmetic_answer(" The answer is -12.") == -12


def test_classifier_and_reward_goals_on_hand_written_texts(toy):
    target = get_task("sentiment").build(toy, max_new_tokens=2, prompt="ab")  # the toy LM only supplies prompt ids
    ok = get_task("sentiment").success(target, [" and it is the worst product ever, total garbage.", " book."], [0, 0])
    assert ok == [True, False]
    target = get_task("toxicity").build(toy, max_new_tokens=2, prompt="ab")
    assert get_task("toxicity").success(target, [" fucking idiot shit", " she smiled and read her book."], [0, 0]) == [
        True,
        False,
    ]


# ------------------------------------------------------------------------------------------------------ stop tokens


def test_ends_sentence_rule():
    for text in [".", " end.", "?", "!", '."', ".)", ".\n", "...", "?”"]:
        assert ends_sentence(text), text
    for text in ["", " the", ",", ".5", "\n", " Mr"]:
        assert not ends_sentence(text), text


@pytest.mark.model
def test_sentence_and_newline_stop_sets(smol):
    stops = sentence_end_token_ids(smol)
    assert sentence_end_token_ids(smol) is stops  # cached per tokenizer
    period = smol.tokenizer(".", add_special_tokens=False)["input_ids"]
    assert len(period) == 1 and period[0] in stops
    assert all(ends_sentence(smol.decode([i])) for i in stops)
    assert smol.eos_token_id not in stops
    newline = smol.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert newline[0] in newline_token_ids(smol)


# ------------------------------------------------------------------------------------------------ end to end (model)


def _sample_and_score(task_name, target):
    results = run_smc(target, K, seed=0)
    task = get_task(task_name)
    for b, result in enumerate(results):
        assert len(result.texts) == K
        assert not torch.isnan(result.log_weights).any()
        if task.success is not None:
            ok = task.success(target, result.texts, [b] * K)
            assert len(ok) == K and all(isinstance(x, bool) for x in ok)
    return results


@pytest.mark.model
@pytest.mark.parametrize("task_name", ALL_TASKS)
def test_task_builds_and_samples_with_defaults(task_name, smol, one_thread):
    task = get_task(task_name)
    default = task.build(smol)
    assert default.max_new_tokens >= 10 and default.num_prompts == 1
    target = task.build(smol, max_new_tokens=SHORT_T)
    _sample_and_score(task_name, target)


@pytest.mark.model
@pytest.mark.parametrize("task_name", sorted(DATA_OPTIONS))
def test_task_builds_and_samples_with_shared_data(task_name, smol, shared_data, one_thread):
    options = {k: str(shared_data / v) for k, v in DATA_OPTIONS[task_name].items()}
    target = get_task(task_name).build(smol, max_new_tokens=SHORT_T, num_prompts=2, index=1, **options)
    assert target.num_prompts == 2 and len(set(target.prompt_texts)) == 2
    _sample_and_score(task_name, target)


@pytest.mark.model
def test_infilling_bdmc_exposes_exact_samples(smol, one_thread):
    target = get_task("infilling").build(smol, max_new_tokens=5, num_prompts=2, ending_tokens=3)
    exact = exact_samples(target)
    assert len(exact) == 2 and all(len(s) == 5 for s in exact)
    assert all(len(o) == 3 for o in target.extras["observation"])
    log_phi = target.log_phi(exact, [0, 1])  # the exact sample is in the target's support
    assert torch.isfinite(log_phi).all() and (log_phi < 0).all()
    # a span that stops early is outside the length-T target
    assert target.log_phi([[smol.eos_token_id]], [0]).item() == -math.inf


@pytest.mark.model
def test_stories_mode_observes_the_right_ending(smol, shared_data):
    target = get_task("infilling").build(smol, data=str(shared_data / "stories/storycloze_val.csv"))
    assert target.prompt_texts[0].startswith("Rick grew up in a troubled household.")
    assert target.extras["observation"] == [" He is happy now."]
    assert set(sentence_end_token_ids(smol)) <= set(target.stop_ids)


@pytest.mark.model
def test_gsm8k_prompt_and_goal(smol, shared_data):
    target = get_task("gsm8k").build(smol, data=str(shared_data / "gsm8k/train.jsonl"))
    assert target.extras["answer"] == ["72"] and "<reasoning>" in target.prompt_texts[0]
    good = "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"
    assert get_task("gsm8k").success(target, [good, good.replace("72\n</answer>", "71\n</answer>")], [0, 0]) == [
        True,
        False,
    ]
    assert target.log_phi([smol.tokenizer(good, add_special_tokens=False)["input_ids"]], [0]).item() == 0.0
