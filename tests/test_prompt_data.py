"""Datasets of prompts (``twistlm.prompt_data``) and twist training over them: rows, errors (one line each), the dev
split, the per-update draw, resume, the gsm8k task's dataset, and ``train-twist`` routing to dataset mode.

The training tests run on the toy LM; one test (marked ``model``) routes ``train-twist --task gsm8k`` on the embedded
model through one update.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import twistlm
from twistlm.cli import prompt_batches, run_app
from twistlm.errors import ConfigError
from twistlm.potentials.base import Potential
from twistlm.prompt_data import PromptBatches, PromptDataset, draw_rows
from twistlm.tasks.registry import TASKS, Task, get_task
from twistlm.training import TwistTrainer, TwistTrainingConfig
from twistlm.twists.io import build_twist, load_twist
from twistlm.twists.tabular import TabularTwist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import exact_kl  # KL(σ‖q) by enumeration, shared with the trainer tests

USAGE_ERROR = 2
pytestmark = pytest.mark.usefixtures("one_thread")


class LetterByRow(Potential):
    """φ(s) = 0.02 + 0.98·1[letter (1 + label) in s]: each row's own goal, read from its ``label`` column."""

    name = "letter-by-row"
    bounded = True

    def log_phi(self, seqs):
        return torch.tensor(
            [math.log(0.02 + 0.98 * ((1 + lab) in ids)) for ids, lab in zip(seqs.token_ids, seqs.extras["label"])],
            dtype=torch.float64,
        )


ROWS = [
    {"prompt": "a", "answer": "x", "label": 0},
    {"prompt": "b", "answer": "y", "label": 1},
    {"prompt": "c", "answer": "z", "label": 2},
]


@pytest.fixture(scope="module")
def lm():
    return twistlm.ToyLM(vocab_size=5, seed=1)


class ShortToy(twistlm.ToyLM):
    """The toy LM with a 5-token context."""

    max_length = 5


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------------------- rows


def test_rows_with_prompts_questions_and_messages():
    data = PromptDataset.from_rows(ROWS)
    assert data.prompts == ("a", "b", "c") and data.answers == ["x", "y", "z"]
    assert data.extras == {"answer": ["x", "y", "z"], "label": [0, 1, 2]}  # every column but the prompt

    asked = PromptDataset.from_rows(
        [{"question": "2+2?", "answer": "#### 4"}], make_prompt=lambda q: [{"role": "user", "content": q}]
    )
    assert asked.prompts == ([{"role": "user", "content": "2+2?"}],) and asked.extras == {"answer": ["#### 4"]}
    # with both, the prompt is the prompt and the question is one more column (as TRL passes it to rewards)
    both = PromptDataset.from_rows([{"prompt": [{"role": "user", "content": "hi"}], "question": "q", "answer": 1}])
    assert both.prompts[0] == [{"role": "user", "content": "hi"}] and both.extras == {"question": ["q"], "answer": [1]}


def test_a_datasets_dataset_is_read_like_a_list_of_dicts():
    datasets = pytest.importorskip("datasets")
    data = PromptDataset.from_rows(datasets.Dataset.from_list(ROWS))
    assert data == PromptDataset.from_rows(ROWS)


@pytest.mark.parametrize(
    ("rows", "needle"),
    [
        ([{"prompt": "a", "answer": "x"}, {"prompt": "b"}], "the dataset, row 2 has no 'answer'"),
        ([{"prompt": "a", "answer": None}], "row 1 has no 'answer'"),
        ([], "the dataset is empty"),
        ([{"text": "a", "answer": 1}], "row 1 has neither 'prompt' nor 'question'"),
        ([{"prompt": 3, "answer": 1}], "row 1: the prompt must be text or a list of chat messages"),
        ([{"prompt": [{"role": "user"}], "answer": 1}], "needs string 'role' and 'content'"),
        ([{"question": ["a"], "answer": 1}], "'question' must be text"),
        ([{"prompt": "a", "answer": 1, "label": 0}, {"prompt": "b", "answer": 2}], "row 2: column 'label' is not in"),
        ([{"prompt": "a", "answer": 1, "completions": 0}], "column 'completions' clashes"),
        (["a"], "row 1: expected a dict of columns"),
    ],
)
def test_bad_rows_are_one_line_naming_the_row(rows, needle):
    with pytest.raises(ConfigError) as exc:
        PromptDataset.from_rows(rows)
    assert needle in one_line(exc)


def test_a_question_longer_than_the_context_names_its_row(lm):
    short = ShortToy(vocab_size=5, seed=1)
    data = PromptDataset.from_rows([{"prompt": "a", "answer": 1}, {"prompt": "abcd", "answer": 2}], source="qs.jsonl")
    with pytest.raises(ConfigError) as exc:
        data.as_target(short, None, 2)
    assert "qs.jsonl, row 2: the prompt has 4 tokens, which with max_new_tokens 2 exceeds the model's context of 5" \
        in one_line(exc)
    template = twistlm.Target(short, prompt="a", max_new_tokens=2)
    with pytest.raises(ConfigError, match="row 2: the prompt has 4 tokens"):
        data.target(template)
    assert data.slice(0, 1).as_target(short, None, 2).num_prompts == 1


def test_target_takes_everything_but_prompts_and_extras_from_the_template(lm):
    data = PromptDataset.from_rows(ROWS)
    template = twistlm.Target(lm, prompt="d", potential=LetterByRow(), max_new_tokens=3, stop_token_ids=(2,),
                              extras={"label": [3]})
    target = data.target(template)
    assert target.prompts == ["a", "b", "c"] and target.extras == data.extras
    assert target.potential is template.potential and target.stop_ids == template.stop_ids
    sub = target.select([2, 0])
    assert sub.prompts == ["c", "a"] and sub.extras["label"] == [2, 0]


def test_grpo_reward_functions_plug_in_unchanged(lm):
    """A reward function written for TRL's conversational data (the GRPO recipe's style) scores the dataset's rows
    with their own answers (a column of the dataset), called as GRPOTrainer calls it."""
    from twistlm.potentials.gsm8k_rewards import extract_xml_answer
    from twistlm.potentials.rewards import RewardPotential

    seen = []

    def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
        responses = [completion[0]["content"] for completion in completions]
        seen.extend(p[-1]["content"] for p in prompts)
        extracted_responses = [extract_xml_answer(r) for r in responses]
        return [2.0 if r == a else 0.0 for r, a in zip(extracted_responses, answer)]

    rows = [{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": "d"}]
    target = PromptDataset.from_rows(rows).as_target(
        lm, RewardPotential([correctness_reward_func], conversational=True), 1, stop_at_eos=False
    )
    result = twistlm.run_smc(target, 16, ess_threshold=0.0, seed=0)
    for r, row in zip(result, rows):
        assert r.log_phi.tolist() == [2.0 if t == row["answer"] else 0.0 for t in r.texts]
    assert set(seen) == {"a", "c"}


# ----------------------------------------------------------------------------------------------------- dev split


def test_the_dev_split_is_the_last_rows():
    data = PromptDataset.from_rows([{"prompt": str(i), "answer": i} for i in range(10)], source="d.jsonl")
    dev, train = data.part("dev", 3), data.part("train", 3)
    assert dev.answers == [7, 8, 9] and dev.first_row == 8
    assert train.answers == list(range(7)) and train.first_row == 1
    assert data.part("all", 3) is data
    assert dev.slice(1).answers == [8, 9] and dev.slice(1).first_row == 9
    for name, size, needle in [
        ("train", 10, "dev_size 10 leaves no training rows"),
        ("dev", 0, "the dev split is empty"),
        ("dev", 11, "dev_size 11 exceeds its 10 rows"),
        ("test", 1, "unknown part 'test'"),
        ("dev", -1, "dev_size must be an integer ≥ 0"),
    ]:
        with pytest.raises(ConfigError) as exc:
            data.part(name, size)
        assert needle in one_line(exc)


def test_gsm8k_task_dev_split_and_dataset(shared_data, tmp_path):
    path = str(shared_data / "gsm8k" / "train.jsonl")
    task = get_task("gsm8k")
    assert task.answer.count(data=path) == 7473
    assert task.answer.count(data=path, part="dev") == 500 and task.answer.count(data=path, part="train") == 6973
    dev = task.dataset(data=path, part="dev")
    lines = Path(path).read_text().splitlines()
    assert dev.first_row == 6974 and len(dev) == 500
    assert dev.prompts[0][1]["content"] == json.loads(lines[6973])["question"]
    assert dev.prompts[0][0]["role"] == "system" and dev.answers[0] == json.loads(lines[6973])["answer"].split("#### ")[1]
    assert task.dataset(data=path, part="dev", index=2).first_row == 6976
    assert len(task.dataset(data=path, part="train", dev_size=7000)) == 473
    with pytest.raises(ConfigError, match="index 500 is past the last problem"):
        task.dataset(data=path, part="dev", index=500)
    with pytest.raises(ConfigError, match="part .* needs data=PATH"):
        task.dataset(data=None, part="dev")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.jsonl is empty"):
        task.dataset(data=str(empty))


def test_gsm8k_format_check():
    formatted = get_task("gsm8k").formatted
    good = "<reasoning>\nThree boxes of 4.\n12 - 2 = 10\n</reasoning>\n<answer>\n10\n</answer>\n"
    assert formatted(None, [good, "10", "<answer>10</answer>"], [0, 0, 0]) == [True, False, False]


# ------------------------------------------------------------------------------------------------ batches


def test_draw_rows_is_seeded_and_without_replacement():
    a = draw_rows(10, 4, torch.Generator().manual_seed(3))
    assert a == draw_rows(10, 4, torch.Generator().manual_seed(3))
    assert len(set(a)) == 4 and all(0 <= i < 10 for i in a)
    gen = torch.Generator().manual_seed(0)
    seen = {i for _ in range(20) for i in draw_rows(10, 3, gen)}
    assert seen == set(range(10))


def _config(**kw) -> TwistTrainingConfig:
    base = {"output_dir": "unused", "loss": "ctl", "learning_rate": 0.02, "max_steps": 400, "num_particles": 32,
            "positives": "exact", "lr_scheduler_type": "linear", "logging_steps": 10**6, "save_steps": 0,
            "prompts_per_step": 2, "plot": False}
    return TwistTrainingConfig(**{**base, **kw})


def test_prompt_batches_refuse_what_cannot_work(lm):
    target = PromptDataset.from_rows(ROWS).as_target(lm, LetterByRow(), 3)
    with pytest.raises(ConfigError, match="prompts_per_step 4 exceeds the 3 prompts"):
        PromptBatches(target, 4)
    with pytest.raises(ConfigError, match="buffer positives keep a replay pool per prompt"):
        PromptBatches.for_config(target, _config(positives="buffer"))
    with pytest.raises(ConfigError, match="corpus"):
        PromptBatches.for_config(target, _config(corpus_size=8))
    with pytest.raises(ConfigError, match="per-prompt tabular twist"):
        PromptBatches.for_config(target, _config(), TabularTwist.for_target(target, per_prompt=True))
    with pytest.raises(ConfigError, match="prompts_per_step must be ≥ 0"):
        _config(prompts_per_step=-1)
    assert PromptBatches.for_config(target, _config(prompts_per_step=0)) is None


def test_training_over_a_dataset_reaches_each_prompts_optimum(lm):
    """Three prompts, each with its own goal (a column of its row); every update draws two of them. One MLP twist,
    conditioned on the prompt only through the LM's hidden state, ends within KL(σ‖q) < 0.05 of every prompt's σ."""
    target = PromptDataset.from_rows(ROWS).as_target(lm, LetterByRow(), 3)
    twist = build_twist("mlp", lm, target, width=128, depth=2, dtype="float64")
    before = [exact_kl(target, twist, b) for b in range(3)]
    trainer = TwistTrainer(twist, target, _config())
    drawn = set()
    for _ in range(trainer.config.max_steps):
        trainer.training_step()
        assert trainer.target.num_prompts == 2
        assert trainer.target.extras["label"] == [ROWS[i]["label"] for i in trainer.prompt_batches.rows]
        drawn.update(trainer.prompt_batches.rows)
    assert drawn == {0, 1, 2}
    after = [exact_kl(target, twist, b) for b in range(3)]
    print("dataset-level KL(σ‖q) per prompt", before, "→", after)
    assert max(after) < 0.05 and all(a < b / 5 for a, b in zip(after, before))


def _resumable(lm, out: Path, steps: int, resume: bool):
    target = PromptDataset.from_rows(ROWS).as_target(lm, LetterByRow(), 3)
    twist = build_twist("mlp", lm, target, width=16, depth=1, dtype="float64", init_scale=0.1)
    cfg = _config(output_dir=str(out), max_steps=steps, num_particles=4, positives="smc", save_steps=3,
                  logging_steps=3, resume=resume, seed=5, lr_scheduler_type="constant")
    return TwistTrainer(twist, target, cfg)


def test_resume_draws_the_same_questions_as_an_uninterrupted_run(lm, tmp_path):
    first = _resumable(lm, tmp_path / "run", 3, resume=False)
    first.train()
    resumed = _resumable(lm, tmp_path / "run", 6, resume=True)
    rows = []
    resumed.update_target = _recording(resumed, rows)
    resumed.train()
    reference = _resumable(lm, tmp_path / "ref", 6, resume=False)
    ref_rows = []
    reference.update_target = _recording(reference, ref_rows)
    reference.train()
    assert rows == ref_rows[3:]
    for a, b in zip(resumed.twist.parameters(), reference.twist.parameters()):
        assert torch.equal(a, b)
    assert load_twist(tmp_path / "run", lm) is not None


def _recording(trainer, rows: list):
    original = trainer.update_target

    def update_target():
        original()
        rows.append(list(trainer.prompt_batches.rows))

    return update_target


# ---------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def toy_dataset_task(monkeypatch):
    """Task ``toy-rows``: ROWS as a dataset (with part/dev_size like gsm8k's), φ = LetterByRow, horizon 3."""

    def data(index=0, part="all", dev_size=1, data=None):
        return PromptDataset.from_rows(ROWS, source="toy rows").part(part, dev_size).slice(index)

    def build(lm, max_new_tokens=None, num_prompts=1, **options):
        return data(**options).slice(0, num_prompts).as_target(lm, LetterByRow(), max_new_tokens or 3)

    options = {"data": "unused", "index": "first row", "part": "all|train|dev", "dev_size": "dev rows"}
    task = Task("toy-rows", "rows", build, options=options, dataset=data)
    monkeypatch.setitem(TASKS, "toy-rows", task)
    return task


def test_dataset_mode_is_inferred_from_a_data_file_without_index(toy_dataset_task):
    gsm8k = get_task("gsm8k")
    assert prompt_batches.resolve(gsm8k, {}, {}) == ({}, {})  # the built-in question: one target
    opts, extra = prompt_batches.resolve(toy_dataset_task, {"data": "x"}, {})
    assert opts == {"data": "x", "part": "train"} and extra == {"prompts_per_step": prompt_batches.DEFAULT_PROMPTS_PER_STEP}
    assert prompt_batches.resolve(toy_dataset_task, {"data": "x", "index": 2}, {}) == ({"data": "x", "index": 2}, {})
    assert prompt_batches.resolve(toy_dataset_task, {"data": "x"}, {"prompts_per_step": 0})[1] == {"prompts_per_step": 0}
    opts, _ = prompt_batches.resolve(toy_dataset_task, {"part": "all"}, {"prompts_per_step": 2})
    assert opts == {"part": "all"}
    # A task without a dataset trains over the prompts it builds: refused only when it builds one
    # (test_infilling_twist.py: training_target).
    assert prompt_batches.resolve(get_task("sentiment"), {}, {"prompts_per_step": 2}) == ({}, {"prompts_per_step": 2})


def test_cli_trains_over_the_train_part(toy_dataset_task, tmp_path, capsys):
    out = tmp_path / "tw"

    def argv(size: int, *extra: str) -> list[str]:
        return ["train-twist", "--task", "toy-rows", "-o", "data=rows", "--model", "toy", "--twist-kind", "mlp",
                "-K", "4", "--logging-steps", "2", "--save-steps", "2", "-t", f"prompts_per_step={size}",
                "--out", str(out), *extra]

    assert run_app(argv(2, "--steps", "4")) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "training over 2 questions (rows 1–2 of toy rows), 2 per update; part=train" in stdout
    config = json.loads((out / "training_config.json").read_text())
    assert config["prompts_per_step"] == 2 and config["task_options"] == {"data": "rows", "part": "train"}
    # a resume with another batch size is refused, naming it
    assert run_app(argv(1, "--steps", "6", "--resume")) == USAGE_ERROR
    assert "prompts_per_step" in capsys.readouterr().err


def test_cli_train_twist_dataset_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from twistlm.cli import train_twist

    monkeypatch.setattr(train_twist, "load_model", lambda name: pytest.fail("the model must not be loaded"))
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for path, needle in [(no_answer, "line 2: missing field 'answer'"), (empty, "empty.jsonl is empty")]:
        code = run_app(["train-twist", "--task", "gsm8k", "-o", f"data={path}", "--out", str(tmp_path / "o"),
                        "--steps", "1"])
        err = capsys.readouterr().err.strip()
        assert code == USAGE_ERROR and len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.model
def test_cli_train_twist_gsm8k_routes_to_dataset_mode(tmp_path, capsys):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(6)]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tw"
    argv = ["train-twist", "--task", "gsm8k", "-o", f"data={data}", "-o", "dev_size=2", "--steps", "1", "-K", "2",
            "-T", "4", "-t", "prompts_per_step=2", "--positives", "smc", "--out", str(out), "-q", "-t", "plot=false"]
    assert run_app(argv) == 0, capsys.readouterr().err
    config = json.loads((out / "training_config.json").read_text())
    assert config["prompts_per_step"] == 2 and config["task_options"]["part"] == "train"
    assert (out / "twist.safetensors").is_file()


# --------------------------------------------------------------------------------------- one prefill per question


def test_long_prompts_are_encoded_once_per_question(tiny_hf):
    """Sampling and the trainer's features feed each question's prompt to the model once, not once per particle;
    the shared-prefill features equal the one-pass-per-row ones."""
    from twistlm.twists.features import hf_prefix_hidden, prefix_features

    target = twistlm.Target(tiny_hf, prompts=["a long question here", "short one"], max_new_tokens=4)
    fed = []
    hook = tiny_hf._backbone.register_forward_pre_hook(lambda m, args, kw: fed.append(tuple(kw["input_ids"].shape)),
                                                       with_kwargs=True)
    try:
        results = twistlm.run_smc(target, 5, seed=0)
        assert fed[0] == (2, max(len(p) for p in target.prompt_ids))  # B prompts, not B·K rows
        assert all(shape == (10, 1) for shape in fed[1:])
        fed.clear()
        seqs = [ids for r in results for ids in r.token_ids]
        index = [b for b in range(2) for _ in range(5)]
        feats = prefix_features(tiny_hf, target.prompt_ids, seqs, prompt_index=index, max_new_tokens=4)
        assert fed == [(2, max(len(p) for p in target.prompt_ids)), (10, 3)]
    finally:
        hook.remove()
    rows = [target.prompt_ids[b] for b in index]
    with torch.no_grad():
        per_row = hf_prefix_hidden(tiny_hf._backbone, rows, feats.tokens, tiny_hf.eos_token_id, tiny_hf.device)
    torch.testing.assert_close(feats.hidden, per_row.float(), atol=1e-5, rtol=1e-5)
    # the shared-prefill features feed a head with grad (they are not inference-mode tensors)
    head = build_twist("mlp", tiny_hf, target, width=8)
    head.log_psi_prefixes(feats).sum().backward()
    assert all(p.grad is not None for p in head.parameters() if p.requires_grad)
