"""Tests for the safe arithmetic evaluator and the calculator tool."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twistlm.data import load_arithmetic
from twistlm.errors import TwistLMError
from twistlm.tasks.calculator import (
    MAX_EXPRESSION_LENGTH,
    CalculatorError,
    apply_calculator,
    format_number,
    parse_final_answer,
    safe_eval,
)

FAST_SECONDS = 1.0
"""A rejected expression must come back within this many seconds (it must never be computed)."""


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("3 + 4 - 2", 5),
        ("0 - 9 + 7", -2),
        ("-3", -3),
        ("- -3", 3),
        ("+4", 4),
        ("2 + 3 * 4", 14),
        ("(2 + 3) * 4", 20),
        ("10 - 2 - 3", 5),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("7 // 2", 3),
        ("-7 // 2", -4),
        ("7 % 3", 1),
        ("7 / 2", 3.5),
        ("6 / 3", 2.0),
        ("2 ** -1", 0.5),
        ("1.5 + 1.5", 3.0),
        ("  ((1))  ", 1),
    ],
)
def test_safe_eval_results(expr: str, expected: float) -> None:
    assert safe_eval(expr) == expected


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('ls')",
        "().__class__",
        "open('x')",
        "x",
        "'a'*10",
        "lambda: 1",
        "[i for i in (1, 2)]",
        "True + 1",
        "1 if 1 else 2",
        "1 < 2",
        "1j",
        "1 << 3",
        "~1",
        "not 1",
        "(1, 2)",
        "[1][0]",
        "1; 2",
        "",
        "   ",
        "1 +",
    ],
)
def test_safe_eval_rejects_non_arithmetic(expr: str) -> None:
    with pytest.raises(CalculatorError):
        safe_eval(expr)


def test_calculator_error_is_a_twistlm_error() -> None:
    assert issubclass(CalculatorError, TwistLMError)


@pytest.mark.parametrize("expr", ["9**9**9", "2**10000", "10**100*10**100", "(10**18)*(10**18)", "1e308*10", "1e400"])
def test_huge_values_rejected_fast(expr: str) -> None:
    start = time.perf_counter()
    with pytest.raises(CalculatorError):
        safe_eval(expr)
    assert time.perf_counter() - start < FAST_SECONDS


@pytest.mark.parametrize("expr", ["1 / 0", "1 // 0", "1 % 0", "1.0 / 0.0", "0 ** -1"])
def test_division_by_zero(expr: str) -> None:
    with pytest.raises(CalculatorError, match="division by zero"):
        safe_eval(expr)


def test_too_long_and_too_deep() -> None:
    with pytest.raises(CalculatorError, match="characters"):
        safe_eval("1 + " * MAX_EXPRESSION_LENGTH + "1")
    with pytest.raises(CalculatorError):
        safe_eval("-" * (MAX_EXPRESSION_LENGTH - 1) + "1")
    deep = 60  # 60 nested negations: a syntax tree deeper than MAX_NESTING_DEPTH, yet under the length limit
    with pytest.raises(CalculatorError, match="nested"):
        safe_eval("-(" * deep + "1" + ")" * deep)
    assert safe_eval("(" * 90 + "1" + ")" * 90) == 1  # parentheses alone add no tree depth


def test_negative_base_fractional_exponent() -> None:
    with pytest.raises(CalculatorError):
        safe_eval("(-8) ** 0.5")


@pytest.mark.parametrize(
    ("value", "text"),
    [(3, "3"), (-2, "-2"), (4.0, "4"), (-0.0, "0"), (3.5, "3.5"), (0.1 + 0.2, "0.3"), (2 / 3, "0.6666666667")],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2 - 3 =", ("1 + 2 - 3 = 0", True)),
        ("3 + 4 - 2 =", ("3 + 4 - 2 = 5", True)),
        ("Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 =", ("Question: 6 - 0 - 4 - 8 = ? Answer: 6 - 0 = 6", True)),
        ("6 - 0 = 6, 6 - 4 =", ("6 - 0 = 6, 6 - 4 = 2", True)),
        ("6 - 0 = 6, 6 - 4 = 2, 2 - 8 =", ("6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6", True)),
        ("answer: -6 + 3 =", ("answer: -6 + 3 = -3", True)),
        ("7 / 2 =", ("7 / 2 = 3.5", True)),
        ("1 + 2 =  \n", ("1 + 2 = 3", True)),
        ("1 + 2 = 3", ("1 + 2 = 3", False)),
        ("no expression =", ("no expression =", False)),
        ("1 + =", ("1 + =", False)),
        ("1 / 0 =", ("1 / 0 =", False)),
        ("9**9**9 =", ("9**9**9 =", False)),
        ("=", ("=", False)),
        ("", ("", False)),
    ],
)
def test_apply_calculator(text: str, expected: tuple[str, bool]) -> None:
    assert apply_calculator(text) == expected


def test_apply_calculator_long_text_is_fast() -> None:
    text = "1 + " * 100_000 + "1 ="
    start = time.perf_counter()
    assert apply_calculator(text) == (text, False)
    assert time.perf_counter() - start < FAST_SECONDS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (". The answer is 11.", 11),
        (". The answer is -6.", -6),
        ("6 - 0 = 6, 6 - 4 = 2, 2 - 8 = -6. The answer is -6", -6),
        ("5-3", 3),
        ("no number", None),
        ("", None),
        ("9" * 1000, None),
    ],
)
def test_parse_final_answer(text: str, expected: int | None) -> None:
    assert parse_final_answer(text) == expected


# ----- property test: random small integer expressions against a reference built from the syntax tree -----


@dataclass(frozen=True)
class _Leaf:
    value: int


@dataclass(frozen=True)
class _Op:
    symbol: str
    left: _Leaf | _Op
    right: _Leaf | _Op


_REFERENCE_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_MAX_LEAVES = 12
_SMALL_INT = 9


def _render(node: _Leaf | _Op) -> str:
    """Fully parenthesised rendering: the tree fixes the evaluation order."""
    if isinstance(node, _Leaf):
        return str(node.value)
    return f"({_render(node.left)} {node.symbol} {_render(node.right)})"


def _reference(node: _Leaf | _Op) -> int:
    if isinstance(node, _Leaf):
        return node.value
    return _REFERENCE_OPS[node.symbol](_reference(node.left), _reference(node.right))


_trees = st.recursive(
    st.builds(_Leaf, st.integers(-_SMALL_INT, _SMALL_INT)),
    lambda children: st.builds(_Op, st.sampled_from(sorted(_REFERENCE_OPS)), children, children),
    max_leaves=_MAX_LEAVES,
)


@given(_trees)
def test_safe_eval_matches_tree_reference(tree: _Leaf | _Op) -> None:
    assert safe_eval(_render(tree)) == _reference(tree)


def _flat_reference(numbers: list[int], symbols: list[str]) -> int:
    """Precedence by hand: split into +/- separated terms, each term a product."""
    total, term, sign = 0, numbers[0], 1
    for symbol, number in zip(symbols, numbers[1:], strict=True):
        if symbol == "*":
            term *= number
        else:
            total += sign * term
            term, sign = number, (1 if symbol == "+" else -1)
    return total + sign * term


@given(st.data())
def test_safe_eval_precedence_matches_reference(data: st.DataObject) -> None:
    numbers = data.draw(st.lists(st.integers(0, _SMALL_INT), min_size=1, max_size=_MAX_LEAVES))
    symbols = data.draw(
        st.lists(st.sampled_from(sorted(_REFERENCE_OPS)), min_size=len(numbers) - 1, max_size=len(numbers) - 1)
    )
    text = str(numbers[0]) + "".join(f" {s} {n}" for s, n in zip(symbols, numbers[1:], strict=True))
    assert safe_eval(text) == _flat_reference(numbers, symbols)


# ----- integration with the real arithmetic data -----

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_calculator_replays_training_rationales() -> None:
    """Replaying each calculator-style rationale step by step ends on the gold solution."""
    path = DATA_DIR / "arithmetic" / "train_50.json"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    for example in load_arithmetic(path):
        assert example.rationale is not None
        text = example.query
        for step in example.rationale.split(", "):
            text, applied = apply_calculator(f"{text} {step}")
            assert applied, text
            text += ","
        assert parse_final_answer(text) == example.solution, text


@given(st.text(alphabet="0123456789 +-*/%().e_jx", max_size=MAX_EXPRESSION_LENGTH))
def test_safe_eval_on_arbitrary_text_returns_a_number_or_calculator_error(text: str) -> None:
    try:
        value = safe_eval(text)
    except CalculatorError:
        return
    assert isinstance(value, int | float) and not isinstance(value, bool)
