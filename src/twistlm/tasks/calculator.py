"""A safe arithmetic evaluator and the calculator tool of the arithmetic task.

In the arithmetic task (1-digit +/- problems, as in the GFlowNet fine-tuning paper) the model writes a step such as
``"3 + 4 - 2 ="`` and a calculator splices the value in: ``"3 + 4 - 2 = 5"``. The model then continues from there.

Safety. Expressions come from a language model, so they are untrusted. :func:`safe_eval` never calls ``eval``: it
parses with ``ast.parse(mode="eval")`` and walks a whitelist of node types

    e ::= n | +e | -e | e ∘ e | (e),   n an int or float literal,   ∘ ∈ {+, −, ×, /, //, %, **}

and rejects anything else (names, calls, attributes, subscripts, strings, booleans, lambdas, ...) with a
:class:`CalculatorError`. Every value v it produces, intermediate or final, satisfies |v| ≤ ``MAX_ABS_VALUE`` and is
finite. A power b ** e is computed only when |e| ≤ ``MAX_EXPONENT`` and the predicted magnitude
log10 |b ** e| = e · log10 |b| ≤ log10 ``MAX_ABS_VALUE``, so ``9**9**9`` or ``2**10000`` are rejected before any
big-number arithmetic happens. Input length and nesting depth are bounded too, so evaluation is O(length) and can
neither hang nor exhaust memory.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable

from twistlm.errors import TwistLMError

MAX_EXPRESSION_LENGTH = 200
"""Longest expression (characters) that :func:`safe_eval` accepts."""

MAX_NESTING_DEPTH = 50
"""Deepest syntax tree (nested operators; parentheses alone add no depth) that :func:`safe_eval` accepts."""

MAX_ABS_VALUE = 10**18
"""Bound on |v| for every literal, intermediate and final value."""

MAX_EXPONENT = 100
"""Bound on |e| in a power b ** e."""

FLOAT_SIGNIFICANT_DIGITS = 10
"""Non-integral floats are printed with this many significant digits (``format(x, ".10g")``)."""

MAX_ANSWER_DIGITS = 100
""":func:`parse_final_answer` ignores a final digit run longer than this (it is no sensible answer)."""

EXPRESSION_CHARACTERS = frozenset("0123456789 +-*/().")
"""Characters that :func:`apply_calculator` treats as part of the trailing expression before ``=``."""

_LOG10_MAX_ABS_VALUE = math.log10(MAX_ABS_VALUE)
_INTEGER_PATTERN = re.compile(r"(?<!\d)-?\d+")

Number = int | float

_BINARY_OPERATORS: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}

_UNARY_OPERATORS: dict[type[ast.unaryop], Callable[[Number], Number]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}


class CalculatorError(TwistLMError):
    """An expression the calculator refuses: bad syntax, a disallowed construct, a too large value, division by 0."""


def safe_eval(expr: str) -> int | float:
    """Evaluate an arithmetic expression over int/float literals with + − × / // % ** and parentheses.

    Follows Python's precedence and semantics (``/`` is true division, ``-2 ** 2 == -4``) on the whitelisted subset
    described in the module docstring. Raises :class:`CalculatorError` for anything else, for values with
    |v| > ``MAX_ABS_VALUE`` or non-finite values, for division by zero, and for inputs longer than
    ``MAX_EXPRESSION_LENGTH`` characters or nested deeper than ``MAX_NESTING_DEPTH``.
    """
    if not isinstance(expr, str):
        raise CalculatorError(f"expression must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_EXPRESSION_LENGTH:
        raise CalculatorError(f"expression has {len(expr)} characters; the limit is {MAX_EXPRESSION_LENGTH}")
    if not expr.strip():
        raise CalculatorError("expression is empty")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as err:
        raise CalculatorError(f"cannot parse {expr!r} as arithmetic: {err}") from err
    return _evaluate(tree.body, depth=1)


def _evaluate(node: ast.AST, depth: int) -> Number:
    """Evaluate one whitelisted node, checking depth and the magnitude of the result."""
    if depth > MAX_NESTING_DEPTH:
        raise CalculatorError(f"expression is nested deeper than {MAX_NESTING_DEPTH} levels")
    if isinstance(node, ast.Constant):
        return _check_value(_literal(node.value))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY_OPERATORS:
        return _check_value(_UNARY_OPERATORS[type(node.op)](_evaluate(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY_OPERATORS or isinstance(node.op, ast.Pow)):
        left = _evaluate(node.left, depth + 1)
        right = _evaluate(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _check_value(_power(left, right))
        try:
            result = _BINARY_OPERATORS[type(node.op)](left, right)
        except ZeroDivisionError as err:
            raise CalculatorError("division by zero") from err
        except OverflowError as err:
            raise CalculatorError(f"result exceeds {MAX_ABS_VALUE:.0e} in magnitude") from err
        return _check_value(result)
    raise CalculatorError(f"unsupported syntax in arithmetic expression: {type(node).__name__}")


def _literal(value: object) -> Number:
    """Accept int and float literals only (``bool`` is an ``int`` subclass and is refused explicitly)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CalculatorError(f"unsupported literal {value!r}: only int and float numbers are allowed")
    return value


def _power(base: Number, exponent: Number) -> Number:
    """b ** e, computed only when |e| ≤ MAX_EXPONENT and e · log10 |b| ≤ log10 MAX_ABS_VALUE (result is small)."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} exceeds the limit {MAX_EXPONENT} in magnitude")
    if base == 0:
        if exponent < 0:
            raise CalculatorError("division by zero (zero to a negative power)")
        return base**exponent
    if base < 0 and not float(exponent).is_integer():
        raise CalculatorError(f"negative base {base} with a fractional exponent {exponent} has no real value")
    if exponent * math.log10(abs(base)) > _LOG10_MAX_ABS_VALUE:
        raise CalculatorError(f"{base} ** {exponent} exceeds {MAX_ABS_VALUE:.0e} in magnitude")
    try:
        return base**exponent
    except (OverflowError, ZeroDivisionError) as err:
        raise CalculatorError(f"cannot compute {base} ** {exponent}: {err}") from err


def _check_value(value: Number) -> Number:
    """Refuse non-finite values and |value| > MAX_ABS_VALUE."""
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError(f"non-finite value {value}")
    if abs(value) > MAX_ABS_VALUE:
        raise CalculatorError(f"value exceeds {MAX_ABS_VALUE:.0e} in magnitude")
    return value


def format_number(x: float) -> str:
    """Print a calculator result (int or float): ints and integral floats as ints (``4.0 → "4"``), others rounded.

    Rounding: a non-integral float is printed with ``FLOAT_SIGNIFICANT_DIGITS`` significant digits via the ``g``
    format (``0.1 + 0.2 → "0.3"``, ``2 / 3 → "0.6666666667"``); if that rounds it to an integer it is printed as one.
    """
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise CalculatorError(f"cannot format {x!r} as a number")
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        raise CalculatorError(f"cannot format non-finite value {x}")
    if x.is_integer():
        return str(int(x))
    text = format(x, f".{FLOAT_SIGNIFICANT_DIGITS}g")
    rounded = float(text)
    return str(int(rounded)) if rounded.is_integer() else text


def apply_calculator(text: str) -> tuple[str, bool]:
    """Splice the value of a trailing ``"<expression> ="`` into the text.

    If ``text`` ends with ``=`` (possibly followed by whitespace) and the maximal run of ``EXPRESSION_CHARACTERS``
    just before that ``=`` is a non-empty expression that :func:`safe_eval` accepts (and is not the tail of a longer
    token such as ``1e18`` or ``x2``: a run that starts right after a letter, digit or ``_`` is refused), returns
    ``(text up to and including "=" + " " + format_number(value), True)``; whitespace after the ``=`` is replaced by
    that single space. Otherwise returns ``(text, False)`` unchanged: the model's output stands as written and the task
    scores it later. Runs in O(len(text)).
    """
    stripped = text.rstrip()
    if not stripped.endswith("="):
        return text, False
    equals_index = len(stripped) - 1
    start = equals_index
    while start > 0 and stripped[start - 1] in EXPRESSION_CHARACTERS:
        start -= 1
    if start > 0 and not stripped[start].isspace() and (stripped[start - 1].isalnum() or stripped[start - 1] == "_"):
        return text, False  # the run is the tail of a longer token ("1e18 * 10", "x2 + 3"): not an expression
    expression = stripped[start:equals_index].strip()
    if not expression or len(expression) > MAX_EXPRESSION_LENGTH:
        return text, False
    try:
        value = format_number(safe_eval(expression))
    except CalculatorError:
        return text, False
    return f"{stripped} {value}", True


def parse_final_answer(text: str) -> int | None:
    """The model's answer: the last integer in ``text`` (a ``-`` directly before it is its sign), or None.

    A minus directly after a digit is read as subtraction, not a sign (``"5-3"`` gives 3). Decimal points are not
    special: ``"2.5"`` gives 5. A final digit run longer than ``MAX_ANSWER_DIGITS`` gives None.
    """
    matches = _INTEGER_PATTERN.findall(text)
    if not matches:
        return None
    last = matches[-1]
    if len(last.lstrip("-")) > MAX_ANSWER_DIGITS:
        return None
    return int(last)
