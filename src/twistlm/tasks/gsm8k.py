"""``gsm8k``: grade-school math word problems with the GRPO recipe's rewards as the potential.

Prompt: chat messages — the recipe's system prompt (:data:`~twistlm.potentials.gsm8k_rewards.SYSTEM_PROMPT`, asking
for ``<reasoning>…</reasoning><answer>…</answer>``) and the question as the user message, rendered with the model's
chat template. Potential: :func:`~twistlm.potentials.gsm8k_potential`, φ(s) = exp(β · (Σ rewards − 4)): the five
rewards (correctness 2.0, integer answer 0.5, strict and soft format 0.5 each, XML tag count ≤ 0.5) with the gold
answer from ``target.extras["answer"]``; shifted by the maximum 4.0 so that φ ≤ 1 (bounded: rejection sampling
works; σ is unchanged by the shift). ``variant=corrected`` (default) or ``recipe`` (the recipe's regex bugs kept).

Data: ``data=PATH`` a GSM8K JSONL (``{"question", "answer"}`` with ``#### <gold>``; ``twistlm.data.load_gsm8k``),
``data=hf`` the Hugging Face hub's ``openai/gsm8k`` (needs ``datasets`` and a network; ``split`` picks the split),
none: a built-in question (hand-written). ``index`` picks the first problem. ``part=train|dev|all`` (default all)
with ``dev_size=N`` (default 500) carves a deterministic dev split: the **last** N rows of the data are ``dev``, the
rows before them ``train`` (:mod:`twistlm.prompt_data`); ``index`` counts within the part. ``TASK.dataset(**options)``
returns the selected problems as a :class:`~twistlm.prompt_data.PromptDataset` (dataset-level twist training,
``twistlm search``); ``formatted`` says whether a completion has the requested tag layout. Default horizon T = 128 (a short
chain of thought; the recipe allows 200+, which is slow on CPU).

Goal (:func:`success`): the answer between the last ``<answer>`` tags equals the gold number (after removing commas,
``$`` and a trailing ``.``), i.e. the corrected correctness reward fires.

Answers (``twistlm solve``, :data:`ANSWERS`, :func:`gsm8k_answer`): with an ``<answer>`` tag, the text after the last
one (the recipe's ``extract_xml_answer``) as a number, else its last number, else unparsed; without the tag, the last
number of the completion (more lenient than :func:`success`, which needs the tags). Numbers are compared in canonical
form (:func:`canonical_number`: commas, ``$`` and a trailing ``.`` removed, ``72.0`` → ``72``), golds likewise.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from twistlm.data import load_gsm8k, load_gsm8k_hf
from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.potentials import gsm8k_potential
from twistlm.potentials.gsm8k_rewards import (
    SYSTEM_PROMPT,
    corrected_correctness_reward_func,
    corrected_soft_format_reward_func,
    extract_xml_answer,
    gold_text,
)
from twistlm.prompt_data import PARTS, PromptDataset
from twistlm.target import Target
from twistlm.tasks.common import Option, define_task, select_examples
from twistlm.tasks.registry import Answers

DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_DEV_SIZE = 500
"""Rows at the end of the data file held out as the dev split (of the 7,473-row train.jsonl: rows 6974–7473)."""
ANSWER_KEY = "answer"
HUB_DATA = "hf"
HUB_DEFAULT_SPLIT = "train"
"""The hub split read by default: GSM8K's test split is kept for independent evaluation, never a default."""

BUILTIN_PROBLEMS = (
    ("Tom has 3 boxes with 4 apples in each box. He eats 2 apples. How many apples does he have left?", "10"),
    ("A pencil costs $2 and a notebook costs $5. How much do 3 pencils and 2 notebooks cost in dollars?", "16"),
)
"""(question, gold) pairs used without a data file. Hand-written, in GSM8K's style."""

OPTIONS = {
    "data": Option(
        None, "GSM8K JSONL path, or 'hf' for openai/gsm8k from the hub (needs `datasets`)", str, optional=True
    ),
    "index": Option(0, "first problem", int, minimum=0),
    "split": Option(HUB_DEFAULT_SPLIT, "split of the hub data set (data=hf only; the test split is for independent "
                    "evaluation: tune on the dev part of train)", str),
    "variant": Option("corrected", "reward variant", str, choices=("corrected", "recipe")),
    "beta": Option(1.0, "φ = exp(beta · (Σ rewards − 4))", float, minimum=0.0),
    "part": Option("all", "rows of the data: all, train (all but the last dev_size) or dev (the last dev_size)", str,
                   choices=tuple(PARTS)),
    "dev_size": Option(DEFAULT_DEV_SIZE, "rows at the end of the data held out as the dev split", int, minimum=0),
}


def messages_for(question: str) -> list[dict[str, str]]:
    """The chat prompt: the recipe's system prompt and the question."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def _problems(data: str | None, split: str, part: str, dev_size: int, needed: int | None = None) -> PromptDataset:
    """The problems of ``data`` (the file, the hub split, or the built-in list) in ``part`` of the dev split, as
    prompts (system prompt + question) with their gold numbers; ``needed``: with part=all, read only that many."""
    limit = needed if part == "all" else None
    if data is None:
        if split != HUB_DEFAULT_SPLIT:
            raise ConfigError("task 'gsm8k': split is for data=hf")
        if part != "all":
            raise ConfigError("task 'gsm8k': part (the dev split) needs data=PATH or data=hf")
        pairs, source = list(BUILTIN_PROBLEMS), "the built-in problem list"
    elif data == HUB_DATA:
        pairs, source = [(e.question, e.gold) for e in load_gsm8k_hf(split=split, limit=limit)], f"openai/gsm8k {split}"
    else:
        if split != HUB_DEFAULT_SPLIT:
            raise ConfigError("task 'gsm8k': split is for data=hf")
        pairs, source = [(e.question, e.gold) for e in load_gsm8k(data, limit=limit)], data
    rows = [{"question": q, ANSWER_KEY: gold} for q, gold in pairs]
    return PromptDataset.from_rows(rows, make_prompt=messages_for, source=source).part(part, dev_size)


def _potential(variant: str, beta: float):
    return gsm8k_potential(variant, beta=beta, bounded=True)


def build(
    lm: ParticleLM,
    T: int,
    B: int,
    *,
    data: str | None,
    index: int,
    split: str,
    variant: str,
    beta: float,
    part: str,
    dev_size: int,
) -> Target:
    problems = _problems(data, split, part, dev_size, needed=index + B)
    label = problems.source if part == "all" else f"the {part} part of {problems.source}"
    select_examples("gsm8k", range(len(problems)), index, B, label)
    return problems.slice(index, index + B).as_target(lm, _potential(variant, beta), T)


def dataset(
    *, data: str | None, index: int, split: str, variant: str, beta: float, part: str, dev_size: int
) -> PromptDataset:
    """The problems of ``part`` from ``index`` on, as a :class:`~twistlm.prompt_data.PromptDataset` (prompt = system
    prompt + question, ``answer`` = the gold number); pair it with :func:`build`'s target for its potential."""
    problems = _problems(data, split, part, dev_size)
    if index >= len(problems):
        raise ConfigError(f"task 'gsm8k': index {index} is past the last problem ({problems.source} has "
                          f"{len(problems)} in part {part!r})")
    return problems.slice(index)


def formatted(target: Target, texts: list[str], prompt_index: list[int]) -> list[bool]:
    """The requested layout ``<reasoning>…</reasoning>`` then ``<answer>…</answer>``: the corrected soft-format
    reward fires (multi-line fields allowed, anchored at the start)."""
    return [r > 0 for r in corrected_soft_format_reward_func([None] * len(texts), list(texts))]


def success(target: Target, texts: list[str], prompt_index: list[int]) -> list[bool]:
    """The goal: the ``<answer>`` equals the gold number (corrected comparison)."""
    golds = [target.extras[ANSWER_KEY][b] for b in prompt_index]
    rewards = corrected_correctness_reward_func([None] * len(texts), list(texts), answer=golds)
    return [r > 0 for r in rewards]


ANSWER_TAG = "<answer>"
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")
_NUMBER_IN_TEXT = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""A number inside text: optional minus and ``$``, digits with proper thousands commas or none, optional decimals."""


def canonical_number(text: str) -> str | None:
    """``text`` as a canonical number string (commas, ``$``, spaces and a trailing ``.`` removed; ``"1,000.0"`` →
    ``"1000"``, ``"-0"`` → ``"0"``), or None if it is not a plain number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return "0" if value == 0 else format(value.normalize(), "f")


def _last_number(text: str) -> str | None:
    found = _NUMBER_IN_TEXT.findall(text)
    return canonical_number(found[-1]) if found else None


def gsm8k_answer(completion: str) -> str | None:
    """The answer of a completion (module docstring): the ``<answer>`` field as a number, else its last number; the
    completion's last number without the tag; None if there is none."""
    if ANSWER_TAG in completion:
        field = extract_xml_answer(completion)
        return canonical_number(field) or _last_number(field)
    return _last_number(completion)


def read_answers(target: Target, texts: list[str], prompt_index: list[int]) -> list[str | None]:
    """:func:`gsm8k_answer` of each completion."""
    return [gsm8k_answer(t) for t in texts]


def gold_answers(target: Target) -> list[str]:
    """The gold number of each problem, canonical (as written when it is not a plain number)."""
    golds = [gold_text(g) for g in target.extras[ANSWER_KEY]]
    return [canonical_number(g) or g for g in golds]


def problem_count(*, data: str | None, split: str, part: str, dev_size: int, **_: object) -> int:
    """Problems in the data (the JSONL file, the hub split, or the built-in list), within ``part``."""
    return len(_problems(data, split, part, dev_size))


ANSWERS = Answers(read=read_answers, gold=gold_answers, count=problem_count)

TASK = define_task(
    "gsm8k",
    "GSM8K word problems, chat prompt with the GRPO recipe's system prompt; φ = exp(β·(Σ recipe rewards − 4)).",
    OPTIONS,
    build,
    DEFAULT_MAX_NEW_TOKENS,
    success,
    answer=ANSWERS,
    dataset=dataset,
    formatted=formatted,
)
