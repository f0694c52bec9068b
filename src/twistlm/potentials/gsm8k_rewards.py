"""GSM8K rule rewards of the widely copied GRPO recipe (willccbb's ``grpo_demo.py`` for Qwen2.5-1.5B-Instruct).

The model is asked (``SYSTEM_PROMPT``) to answer as
``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n``. Five reward functions, each with TRL's signature
``f(prompts, completions, **kwargs) -> list[float]`` and summed with weights ``GSM8K_REWARD_WEIGHTS`` (all 1.0), score
a completion c with extracted answer a = ``extract_xml_answer(c)`` and gold g:

    correctness = 2.0 · [a = g]           int = 0.5 · [a is an integer]
    strict      = 0.5 · [c matches ^<reasoning>\\n.*?\\n</reasoning>\\n<answer>\\n.*?\\n</answer>\\n$]
    soft        = 0.5 · [c matches <reasoning>.*?</reasoning>\\s*<answer>.*?</answer>]   (re.match: anchored at start)
    xmlcount    = count_xml(c) ∈ (−∞, 0.5]: 0.125 per well-formed tag, minus 0.001 per character after </answer>

so a perfect, correct completion earns 2.0 + 0.5 + 0.5 + 0.5 + 0.5 = 4.0 (corrected variant). As a potential,
φ(s) = exp(β · Σ rewards) or an indicator of correctness can be built from these.

Two variants, chosen by name (``gsm8k_reward_functions(variant)``):

* ``"recipe"`` (``RECIPE``): the recipe's exact behaviour, bugs included. The format regexes have no ``re.DOTALL``, so
  ``.*?`` cannot cross a newline: multi-line reasoning scores 0 on strict format, and the soft reward is 0 for every
  completion in the requested format (a newline follows ``<reasoning>``), firing only on one-line tags such as
  ``<reasoning>r</reasoning><answer>7</answer>``; a perfect completion earns 3.5, not 4.0. ``str.isdigit``
  gives negative answers ("-3") and "1,000" no int reward; correctness is string equality, so "1,000" ≠ "1000" and
  "72.0" ≠ "72" (while "-3" = "-3" does score 2.0).
* ``"corrected"`` (``CORRECTED``, the default ``DEFAULT_VARIANT``): ``re.DOTALL`` on both format regexes; the int
  reward accepts an optional leading minus and thousands commas; correctness compares numbers after removing commas,
  ``$`` and a trailing ``.`` (so "1,000", "$1000", "1000.0" and "1000." all equal gold 1000).

Why corrected is the default: the recipe's bugs reward the wrong thing. Without DOTALL the format rewards pay only for
one-line reasoning (and the soft one never for the requested layout), pushing the model to squash its chain of
thought; the int and correctness rewards penalise right answers that are negative or written with a thousands
separator (GSM8K golds include 1,080 and −7).
A sampler or twist trained on such a potential learns the formatting quirks instead of the task. ``count_xml`` is
the same in both variants (its penalty on text after ``</answer>`` is intended shaping).

Gold answers arrive as the keyword ``answer`` (one per completion): an extracted number (str or int) or a raw GSM8K
answer containing ``####``, from which :func:`extract_hash_answer` takes the number (stripped, commas removed: gold
"1,080" becomes "1080"; the recipe's version only stripped whitespace).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from types import MappingProxyType

from twistlm.errors import ConfigError, DataError

SYSTEM_PROMPT = "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"

XML_COT_FORMAT = "<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"
"""A completion in the requested format (used to build gold completions)."""

CORRECTNESS_REWARD = 2.0
INT_REWARD = 0.5
STRICT_FORMAT_REWARD = 0.5
SOFT_FORMAT_REWARD = 0.5
XML_TAG_REWARD = 0.125
"""count_xml pays this for each of the four well-formed tags."""
XML_TRAILING_PENALTY = 0.001
"""count_xml subtracts this per character after the closing answer tag."""

HASH_MARKER = "####"

STRICT_FORMAT_PATTERN = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
SOFT_FORMAT_PATTERN = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"

_RECIPE_STRICT = re.compile(STRICT_FORMAT_PATTERN)
_RECIPE_SOFT = re.compile(SOFT_FORMAT_PATTERN)
_CORRECTED_STRICT = re.compile(STRICT_FORMAT_PATTERN, re.DOTALL)
_CORRECTED_SOFT = re.compile(SOFT_FORMAT_PATTERN, re.DOTALL)
_CORRECTED_INT = re.compile(r"-?(?:\d+|\d{1,3}(?:,\d{3})+)")
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")

Completion = str | Sequence[Mapping[str, object]]
"""A plain string, or a chat-style list of message dicts whose first message holds the text (TRL's format)."""

RewardFn = Callable[..., list[float]]
"""TRL's reward signature: ``f(prompts, completions, **kwargs) -> list[float]``."""


def extract_xml_answer(text: str) -> str:
    """The text between the last ``<answer>`` and the following ``</answer>``, stripped (the recipe's rule)."""
    answer = text.rsplit("<answer>", maxsplit=1)[-1]
    answer = answer.split("</answer>", maxsplit=1)[0]
    return answer.strip()


def extract_hash_answer(text: str) -> str | None:
    """The GSM8K gold after ``####``, stripped, commas removed; None if there is no ``####``."""
    if HASH_MARKER not in text:
        return None
    return text.split(HASH_MARKER)[1].strip().replace(",", "")


def completion_text(completion: Completion) -> str:
    """The text of one completion: the string itself, or ``completion[0]["content"]`` for a chat-style list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[0], Mapping):
        content = completion[0].get("content")
        if isinstance(content, str):
            return content
    raise DataError(
        f"a completion must be a string or a list of message dicts with string 'content'; got {completion!r:.80}"
    )


def gold_text(answer: object) -> str:
    """A gold answer as a string: a raw GSM8K answer (with ``####``) is reduced to its number; numbers are printed."""
    if isinstance(answer, bool) or not isinstance(answer, str | int | float):
        raise DataError(f"a gold answer must be a string or a number; got {answer!r:.80}")
    if isinstance(answer, str):
        extracted = extract_hash_answer(answer)
        return (extracted if extracted is not None else answer).strip()
    return str(answer)


def count_xml(text: str) -> float:
    """The recipe's tag count: 0.125 for each of ``<reasoning>\\n``, ``\\n</reasoning>\\n``, ``\\n<answer>\\n`` and
    ``\\n</answer>`` appearing exactly once, minus 0.001 per character after ``\\n</answer>\\n`` (third term; the
    whole text counts when that string is absent) and per character after ``\\n</answer>`` beyond the first (fourth).
    """
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += XML_TAG_REWARD
    if text.count("\n</reasoning>\n") == 1:
        count += XML_TAG_REWARD
    if text.count("\n<answer>\n") == 1:
        count += XML_TAG_REWARD
        count -= len(text.rsplit("\n</answer>\n", maxsplit=1)[-1]) * XML_TRAILING_PENALTY
    if text.count("\n</answer>") == 1:
        count += XML_TAG_REWARD
        count -= (len(text.rsplit("\n</answer>", maxsplit=1)[-1]) - 1) * XML_TRAILING_PENALTY
    return count


def _texts(completions: Sequence[Completion]) -> list[str]:
    return [completion_text(c) for c in completions]


def _golds(completions: Sequence[Completion], kwargs: Mapping[str, object]) -> list[str]:
    answers = kwargs.get("answer")
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise DataError("correctness rewards need the keyword 'answer': a list with one gold answer per completion")
    if len(answers) != len(completions):
        raise DataError(f"got {len(answers)} gold answers for {len(completions)} completions")
    return [gold_text(a) for a in answers]


def _normalise_number(text: str) -> Decimal | None:
    """Remove commas, ``$``, spaces and a trailing ``.``; the value as a Decimal, or None if not a plain number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not _NUMBER.fullmatch(cleaned):
        return None
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        return None


def _numbers_equal(answer: str, gold: str) -> bool:
    """Numeric equality after normalisation (``"1,000" = "1000.0"``); plain string equality if either isn't numeric."""
    left, right = _normalise_number(answer), _normalise_number(gold)
    if left is None or right is None:
        return answer.strip() == gold.strip()
    return left == right


# ----- the recipe, bugs included -----


def correctness_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """2.0 if the extracted answer equals the gold string exactly, else 0.0 (recipe)."""
    golds = _golds(completions, kwargs)
    return [
        CORRECTNESS_REWARD if extract_xml_answer(t) == g else 0.0
        for t, g in zip(_texts(completions), golds, strict=True)
    ]


def int_reward_func(prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object) -> list[float]:
    """0.5 if the extracted answer satisfies ``str.isdigit`` (so no sign, no comma), else 0.0 (recipe)."""
    return [INT_REWARD if extract_xml_answer(t).isdigit() else 0.0 for t in _texts(completions)]


def strict_format_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """0.5 if the whole completion matches the strict pattern without DOTALL (one-line fields only), else 0.0."""
    return [STRICT_FORMAT_REWARD if _RECIPE_STRICT.match(t) else 0.0 for t in _texts(completions)]


def soft_format_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """0.5 if the completion starts with the soft pattern, without DOTALL, else 0.0 (recipe)."""
    return [SOFT_FORMAT_REWARD if _RECIPE_SOFT.match(t) else 0.0 for t in _texts(completions)]


def xmlcount_reward_func(prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object) -> list[float]:
    """:func:`count_xml` of each completion (same in both variants)."""
    return [count_xml(t) for t in _texts(completions)]


# ----- corrected -----


def corrected_correctness_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """2.0 if the extracted answer equals the gold as a number (commas, ``$``, trailing ``.``/``.0`` ignored)."""
    golds = _golds(completions, kwargs)
    texts = _texts(completions)
    return [
        CORRECTNESS_REWARD if _numbers_equal(extract_xml_answer(t), g) else 0.0
        for t, g in zip(texts, golds, strict=True)
    ]


def corrected_int_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """0.5 if the extracted answer is an integer, optional leading minus and thousands commas allowed."""
    return [INT_REWARD if _CORRECTED_INT.fullmatch(extract_xml_answer(t)) else 0.0 for t in _texts(completions)]


def corrected_strict_format_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """0.5 if the whole completion matches the strict pattern with DOTALL (multi-line fields allowed)."""
    return [STRICT_FORMAT_REWARD if _CORRECTED_STRICT.match(t) else 0.0 for t in _texts(completions)]


def corrected_soft_format_reward_func(
    prompts: Sequence[object], completions: Sequence[Completion], **kwargs: object
) -> list[float]:
    """0.5 if the completion starts with the soft pattern, with DOTALL, else 0.0."""
    return [SOFT_FORMAT_REWARD if _CORRECTED_SOFT.match(t) else 0.0 for t in _texts(completions)]


# ----- registry (keys are the recipe's function names, in the recipe's order) -----

RECIPE: Mapping[str, RewardFn] = MappingProxyType(
    {
        "xmlcount_reward_func": xmlcount_reward_func,
        "soft_format_reward_func": soft_format_reward_func,
        "strict_format_reward_func": strict_format_reward_func,
        "int_reward_func": int_reward_func,
        "correctness_reward_func": correctness_reward_func,
    }
)

CORRECTED: Mapping[str, RewardFn] = MappingProxyType(
    {
        "xmlcount_reward_func": xmlcount_reward_func,
        "soft_format_reward_func": corrected_soft_format_reward_func,
        "strict_format_reward_func": corrected_strict_format_reward_func,
        "int_reward_func": corrected_int_reward_func,
        "correctness_reward_func": corrected_correctness_reward_func,
    }
)

VARIANTS: Mapping[str, Mapping[str, RewardFn]] = MappingProxyType({"recipe": RECIPE, "corrected": CORRECTED})
DEFAULT_VARIANT = "corrected"

GSM8K_REWARD_WEIGHTS: Mapping[str, float] = MappingProxyType({name: 1.0 for name in RECIPE})
"""The recipe sums the five rewards with equal weight."""


def gsm8k_reward_functions(variant: str = DEFAULT_VARIANT) -> dict[str, RewardFn]:
    """The five reward functions of ``variant`` ("recipe" or "corrected"), keyed by the recipe's names."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown GSM8K reward variant {variant!r}; choose one of {sorted(VARIANTS)}")
    return dict(VARIANTS[variant])
