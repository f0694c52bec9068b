"""Tests for the GSM8K rule rewards (recipe and corrected variants) against hand-checked completions."""

from __future__ import annotations

from pathlib import Path

import pytest

from twistlm.data import load_gsm8k
from twistlm.errors import ConfigError, DataError
from twistlm.potentials.gsm8k_rewards import (
    CORRECTED,
    DEFAULT_VARIANT,
    GSM8K_REWARD_WEIGHTS,
    RECIPE,
    SYSTEM_PROMPT,
    XML_COT_FORMAT,
    count_xml,
    extract_hash_answer,
    extract_xml_answer,
    gsm8k_reward_functions,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PROMPTS = [[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 3 + 4?"}]]

PERFECT = "<reasoning>\nIt is 3 + 4 = 7.\n</reasoning>\n<answer>\n7\n</answer>\n"
MULTI_LINE = "<reasoning>\nFirst, 3 + 4 = 7.\nSo the answer is 7.\n</reasoning>\n<answer>\n7\n</answer>\n"
NEGATIVE = "<reasoning>\n4 - 7 = -3.\n</reasoning>\n<answer>\n-3\n</answer>\n"
THOUSAND = "<reasoning>\n10 * 100 = 1000.\n</reasoning>\n<answer>\n1,000\n</answer>\n"
TRAILING = PERFECT + "Hope this helps!"  # 16 characters after the final "\n</answer>\n"
NO_FINAL_NEWLINE = "<reasoning>\nx\n</reasoning>\n<answer>\n7\n</answer>"  # 47 characters


def _scores(variant: str, completion: object, gold: object) -> dict[str, float]:
    """Every reward of ``variant`` for one completion, called as TRL calls them (keywords)."""
    return {
        name: fn(prompts=PROMPTS, completions=[completion], answer=[gold])[0]
        for name, fn in gsm8k_reward_functions(variant).items()
    }


PERFECT_SCORES = {
    "corrected": {
        "xmlcount_reward_func": 0.5,
        "soft_format_reward_func": 0.5,
        "strict_format_reward_func": 0.5,
        "int_reward_func": 0.5,
        "correctness_reward_func": 2.0,
    },
    "recipe": {
        "xmlcount_reward_func": 0.5,
        # The recipe's soft pattern "<reasoning>.*?</reasoning>" has no DOTALL, and the requested format puts a
        # newline right after "<reasoning>", so the soft reward is 0 even for a perfectly formatted completion.
        "soft_format_reward_func": 0.0,
        "strict_format_reward_func": 0.5,
        "int_reward_func": 0.5,
        "correctness_reward_func": 2.0,
    },
}


@pytest.mark.parametrize("variant", ["recipe", "corrected"])
def test_perfect_single_line_completion(variant: str) -> None:
    assert _scores(variant, PERFECT, "7") == PERFECT_SCORES[variant]
    assert _scores(variant, PERFECT, "8")["correctness_reward_func"] == 0.0


def test_recipe_soft_format_fires_only_without_newlines_inside_tags() -> None:
    one_line = "<reasoning>3 + 4 = 7</reasoning> <answer>7</answer>"
    for variant in ("recipe", "corrected"):
        assert _scores(variant, one_line, "7")["soft_format_reward_func"] == 0.5
        assert _scores(variant, "preamble " + one_line, "7")["soft_format_reward_func"] == 0.0  # re.match: anchored


def test_multi_line_reasoning_fails_recipe_format_only() -> None:
    recipe, corrected = _scores("recipe", MULTI_LINE, "7"), _scores("corrected", MULTI_LINE, "7")
    assert recipe["strict_format_reward_func"] == 0.0  # no DOTALL: ".*?" cannot cross the newline
    assert recipe["soft_format_reward_func"] == 0.0
    assert corrected["strict_format_reward_func"] == 0.5
    assert corrected["soft_format_reward_func"] == 0.5
    assert recipe["xmlcount_reward_func"] == corrected["xmlcount_reward_func"] == 0.5
    assert recipe["correctness_reward_func"] == corrected["correctness_reward_func"] == 2.0


@pytest.mark.parametrize("gold", ["-3", -3, "Four minus seven.\n#### -3"])
def test_negative_answer(gold: object) -> None:
    recipe, corrected = _scores("recipe", NEGATIVE, gold), _scores("corrected", NEGATIVE, gold)
    assert recipe["int_reward_func"] == 0.0  # "-3".isdigit() is False
    assert corrected["int_reward_func"] == 0.5
    # The recipe compares strings, and "-3" == "-3", so its correctness reward does work for negative answers.
    assert recipe["correctness_reward_func"] == 2.0
    assert corrected["correctness_reward_func"] == 2.0


def test_thousands_separator() -> None:
    recipe, corrected = _scores("recipe", THOUSAND, "1000"), _scores("corrected", THOUSAND, "1000")
    assert recipe["correctness_reward_func"] == 0.0  # "1,000" != "1000"
    assert corrected["correctness_reward_func"] == 2.0
    assert recipe["int_reward_func"] == 0.0
    assert corrected["int_reward_func"] == 0.5


@pytest.mark.parametrize("written", ["1000", "1,000", "$1,000", "1000.", "1000.0", "1000.00"])
def test_corrected_correctness_normalises(written: str) -> None:
    completion = XML_COT_FORMAT.format(reasoning="r", answer=written)
    assert _scores("corrected", completion, "1000")["correctness_reward_func"] == 2.0
    assert _scores("corrected", completion, "1001")["correctness_reward_func"] == 0.0


def test_xmlcount_trailing_garbage_penalty() -> None:
    # 4 tags × 0.125 = 0.5; third term subtracts len("Hope this helps!") × 0.001 = 0.016; fourth term subtracts
    # (len("\nHope this helps!") − 1) × 0.001 = 0.016. Total 0.5 − 0.032 = 0.468.
    assert count_xml(TRAILING) == pytest.approx(0.468)
    # The recipe's quirk: without the final newline "\n</answer>\n" is absent, so the third term subtracts the whole
    # text (47 × 0.001), and the fourth adds (0 − 1) × −0.001 = +0.001. Total 0.5 − 0.047 + 0.001 = 0.454.
    assert len(NO_FINAL_NEWLINE) == 47
    assert count_xml(NO_FINAL_NEWLINE) == pytest.approx(0.454)
    assert _scores("recipe", NO_FINAL_NEWLINE, "7")["strict_format_reward_func"] == 0.0
    assert count_xml("no tags at all") == 0.0


def test_chat_style_completions() -> None:
    chat = [{"role": "assistant", "content": PERFECT}]
    for variant in ("recipe", "corrected"):
        assert _scores(variant, chat, "7") == PERFECT_SCORES[variant]
    mixed = gsm8k_reward_functions()["correctness_reward_func"](
        prompts=PROMPTS * 2, completions=[chat, MULTI_LINE], answer=["7", "8"]
    )
    assert mixed == [2.0, 0.0]


def test_gold_given_raw_with_hashes() -> None:
    raw = "Ten hundreds make a thousand.\n#### 1,000"
    assert extract_hash_answer(raw) == "1000"
    assert extract_hash_answer("no marker") is None
    assert _scores("recipe", THOUSAND.replace("1,000", "1000"), raw)["correctness_reward_func"] == 2.0
    assert _scores("recipe", THOUSAND, raw)["correctness_reward_func"] == 0.0
    assert _scores("corrected", THOUSAND, raw)["correctness_reward_func"] == 2.0


def test_extract_xml_answer() -> None:
    assert extract_xml_answer(PERFECT) == "7"
    assert extract_xml_answer("<answer>1</answer> then <answer> 2 </answer>") == "2"
    assert extract_xml_answer("  no tags ") == "no tags"


def test_registry() -> None:
    assert DEFAULT_VARIANT == "corrected"
    assert gsm8k_reward_functions() == dict(CORRECTED)
    assert gsm8k_reward_functions("recipe") == dict(RECIPE)
    assert set(GSM8K_REWARD_WEIGHTS) == set(RECIPE) == set(CORRECTED)
    assert set(GSM8K_REWARD_WEIGHTS.values()) == {1.0}
    with pytest.raises(ConfigError, match="unknown GSM8K reward variant"):
        gsm8k_reward_functions("nope")


def test_bad_inputs_raise_data_error() -> None:
    correctness = gsm8k_reward_functions()["correctness_reward_func"]
    with pytest.raises(DataError, match="answer"):
        correctness(prompts=PROMPTS, completions=[PERFECT])
    with pytest.raises(DataError, match="1 gold answers for 2"):
        correctness(prompts=PROMPTS, completions=[PERFECT, PERFECT], answer=["7"])
    with pytest.raises(DataError, match="completion"):
        correctness(prompts=PROMPTS, completions=[[]], answer=["7"])


def test_gold_completions_from_real_data_are_correct() -> None:
    path = DATA_DIR / "gsm8k" / "train.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    examples = load_gsm8k(path, limit=20)
    assert len(examples) == 20
    completions = [XML_COT_FORMAT.format(reasoning="Work it out.", answer=e.gold) for e in examples]
    for variant in ("recipe", "corrected"):
        correctness = gsm8k_reward_functions(variant)["correctness_reward_func"]
        raw = correctness(prompts=PROMPTS * 20, completions=completions, answer=[e.answer for e in examples])
        extracted = correctness(prompts=PROMPTS * 20, completions=completions, answer=[e.gold for e in examples])
        assert raw == extracted == [2.0] * 20
