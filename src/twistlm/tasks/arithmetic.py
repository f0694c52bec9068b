"""``arithmetic``: 1-digit +/− problems with 3-4 operands (the GFlowNet fine-tuning paper's task), few-shot prompted.

Prompt. ``shots`` worked demonstrations (built in, in the data's format), one per line, then the problem's query:

    Question: 2 + 5 - 3 = ? Answer: 2 + 5 = 7, 7 - 3 = 4. The answer is 4.
    ...
    Question: 6 - 0 - 4 - 8 = ? Answer:

The data files' ``str_query`` is ``"Question: … = ? Answer:"``, their ``str_rationale`` the calculator-style steps
``"6 - 0 =, 6 - 4 =, 2 - 8 ="`` (the calculator fills in each value) and ``str_sol`` ``". The answer is -6."``; a
demonstration is that rationale with the values filled in, followed by the solution sentence. A particle finishes at
the end of its line (``stop_token_ids`` = tokens containing a line break, :func:`~twistlm.tasks.common.newline_token_ids`)
or at T (default 40 tokens: a 4-operand solution takes about 30).

Calculator. By default (``tool=true``) the target uses :class:`twistlm.tools.CalculatorTool`: whenever the model
writes ``"<expression> ="`` the sampler splices the calculator's value into that particle (forced tokens, weight 1
under both p0-with-tool and the proposal; see :mod:`twistlm.tools`), so the model *sees* correct intermediate values,
as in the GFlowNet paper. The potential and the metric also read the completion *through* the calculator
(:func:`calculator_text`): every ``"<expression> ="`` is evaluated and its value replaces whatever number follows the
``=`` — a no-op for tool-made text, and with ``tool=false`` (the model writes every number itself) it scores the
model's steps as the calculator would (``"3 + 4 = 8, 8 - 2 = 6"`` is read as ``"3 + 4 = 7, 8 - 2 = 6"``). The answer
is the number after the last "answer is" on the first line of that text, else its last integer
(:func:`arithmetic_answer`). Then

* ``form=exact`` (default): φ(s) = 1[answer = num_sol] (a hard constraint, bounded);
* ``form=soft``: φ(s) = exp(−β · min(|answer − num_sol|, 10)), no answer counting as an error of 10 (bounded, never 0);
* ``form=latent`` (the GFlowNet paper's reward, :func:`latent_target`): the completion is the rationale up to ".",
  φ(z) = p0(" The answer is num_sol." | x, z), so σ is the posterior over rationales given the answer.

With the tool, σ ∝ p_tool · φ where p_tool(s) = Π_{model tokens} p0(s_t | s_<t) (tool tokens have probability 1);
Z, Ẑ and the bounds refer to that tool-augmented model.

Answers (``twistlm solve``, :data:`ANSWERS`): a completion's answer is :func:`arithmetic_answer` as a string, the
gold answer is num_sol (``extras["solution"]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from twistlm.data import load_arithmetic
from twistlm.errors import ConfigError
from twistlm.lm import ParticleLM
from twistlm.potentials.base import Potential, Sequences
from twistlm.potentials.likelihood import OBSERVATION_KEY, InfillingPotential
from twistlm.target import Target
from twistlm.tasks.calculator import apply_calculator, parse_final_answer
from twistlm.tasks.common import Option, define_task, newline_token_ids, select_examples
from twistlm.tasks.registry import Answers
from twistlm.tools import CalculatorTool

DEFAULT_MAX_NEW_TOKENS = 40
LATENT_FORM = "latent"
SOLUTION_KEY = "solution"
"""extras[SOLUTION_KEY]: the correct answer (num_sol) of each prompt."""
SOFT_ERROR_CAP = 10
"""form=soft: |answer − num_sol| is capped at this value (a missing answer counts as this error)."""


@dataclass(frozen=True)
class Problem:
    query: str
    solution: int
    worked: str | None = None
    """Demonstrations only: the answer line after the query (calculator values filled in)."""


DEMONSTRATIONS = (
    Problem("Question: 2 + 5 - 3 = ? Answer:", 4, " 2 + 5 = 7, 7 - 3 = 4. The answer is 4."),
    Problem("Question: 8 - 9 + 4 - 1 = ? Answer:", 2, " 8 - 9 = -1, -1 + 4 = 3, 3 - 1 = 2. The answer is 2."),
    Problem("Question: 6 + 7 + 2 = ? Answer:", 15, " 6 + 7 = 13, 13 + 2 = 15. The answer is 15."),
    Problem("Question: 1 - 4 - 5 + 9 = ? Answer:", 1, " 1 - 4 = -3, -3 - 5 = -8, -8 + 9 = 1. The answer is 1."),
    Problem("Question: 9 + 3 - 7 = ? Answer:", 5, " 9 + 3 = 12, 12 - 7 = 5. The answer is 5."),
)
"""Built-in few-shot demonstrations (hand-written, not taken from the data files)."""

BUILTIN_PROBLEMS = (
    Problem("Question: 3 + 4 - 2 = ? Answer:", 5),
    Problem("Question: 7 - 8 + 6 = ? Answer:", 5),
    Problem("Question: 5 + 2 + 9 - 4 = ? Answer:", 12),
    Problem("Question: 4 - 6 - 1 = ? Answer:", -3),
    Problem("Question: 9 + 8 - 5 + 3 = ? Answer:", 15),
)
"""Problems used without a data file (``index`` picks among them)."""

OPTIONS = {
    "data": Option(None, "JSON array of {str_query, num_sol, ...} (e.g. arithmetic/test_3op.json)", str, optional=True),
    "index": Option(0, "first problem", int, minimum=0),
    "shots": Option(
        3, "number of worked demonstrations before the question", int, minimum=0, maximum=len(DEMONSTRATIONS)
    ),
    "form": Option(
        "exact",
        "φ = 1[answer correct], exp(−beta·min(|error|, 10)), or latent: φ = p0(answer sentence | rationale)",
        str,
        choices=("exact", "soft", "latent"),
    ),
    "beta": Option(1.0, "scale β of the soft form", float, minimum=0.0),
    "tool": Option(True, "splice calculator values into the completions while sampling", bool),
    "exclude": Option(
        None, "comma-separated data files whose queries are dropped from data (held-out evaluation)", str,
        optional=True,
    ),
}

_VALUE_AFTER_EQUALS = re.compile(r"[ \t]*-?\d+(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)


def calculator_text(text: str) -> str:
    """``text`` with every ``"<expression> ="`` followed by the calculator's value (module docstring).

    Left to right: at each ``=``, :func:`apply_calculator` on the text so far splices in the value (when the
    expression before the ``=`` is valid); a number the model wrote right after that ``=`` is dropped (the tool's value
    replaces it). An ``=`` without a valid expression before it is kept as written.
    """
    out = ""
    rest = text
    while True:
        i = rest.find("=")
        if i < 0:
            return out + rest
        head, rest = out + rest[: i + 1], rest[i + 1 :]
        spliced, ok = apply_calculator(head)
        if ok:
            out = spliced
            match = _VALUE_AFTER_EQUALS.match(rest)
            if match:
                rest = rest[match.end() :]
        else:
            out = head


def arithmetic_answer(completion: str) -> int | None:
    """The answer of a completion: on its first line, read through :func:`calculator_text`, the integer after the
    last "answer is", else the last integer of the line; None if there is none."""
    line = calculator_text(completion.split("\n", 1)[0])
    found = list(_ANSWER_IS.finditer(line))
    if found:
        after = parse_final_answer(_first_number_text(line[found[-1].end() :]))
        if after is not None:
            return after
    return parse_final_answer(line)


def _first_number_text(text: str) -> str:
    match = re.search(r"-?\d+", text)
    return match.group(0) if match else ""


class ArithmeticPotential(Potential):
    """φ(s) from the calculator-read answer vs ``extras["solution"]``: exact (indicator) or soft (module docstring)."""

    bounded = True

    def __init__(self, form: str = "exact", beta: float = 1.0):
        if form not in ("exact", "soft"):
            raise ConfigError(f"arithmetic potential form must be 'exact' or 'soft', got {form!r}")
        self.form = form
        self.beta = float(beta)
        self.name = "arithmetic:exact" if form == "exact" else f"arithmetic:soft:{self.beta:g}"

    def log_phi(self, seqs: Sequences) -> torch.Tensor:
        solutions = seqs.extras.get(SOLUTION_KEY)
        if solutions is None:
            raise ConfigError(f"potential {self.name!r} needs extras={{'{SOLUTION_KEY}': [...]}} on the target")
        out = []
        for text, y in zip(seqs.texts, solutions):
            a = arithmetic_answer(text)
            if self.form == "exact":
                out.append(0.0 if a == int(y) else float("-inf"))
            else:
                err = SOFT_ERROR_CAP if a is None else min(abs(a - int(y)), SOFT_ERROR_CAP)
                out.append(-self.beta * err)
        return torch.tensor(out, dtype=torch.float64)


def few_shot_prompt(query: str, shots: int) -> str:
    """``shots`` demonstrations, one per line, then ``query``."""
    lines = [d.query + d.worked for d in DEMONSTRATIONS[:shots]]
    return "\n".join(lines + [query])


def held_out(data: str, exclude: str | None) -> list:
    """The problems of ``data`` whose query occurs in none of the ``exclude`` files (comma-separated)."""
    examples = load_arithmetic(data)
    if not exclude:
        return examples
    seen = {e.query for path in exclude.split(",") if path.strip() for e in load_arithmetic(path.strip())}
    return [e for e in examples if e.query not in seen]


def build(
    lm: ParticleLM,
    T: int,
    B: int,
    *,
    data: str | None,
    index: int,
    shots: int,
    form: str,
    beta: float,
    tool: bool,
    exclude: str | None,
):
    if exclude and data is None:
        raise ConfigError("task 'arithmetic': exclude= needs a data file (data=PATH)")
    if data is not None:
        examples = held_out(data, exclude)
        problems = [Problem(e.query, e.solution) for e in select_examples("arithmetic", examples, index, B, data)]
    else:
        problems = select_examples("arithmetic", BUILTIN_PROBLEMS, index, B, "the built-in problem list")
    if form == LATENT_FORM:
        return latent_target(lm, problems, shots=shots, tool=tool, max_new_tokens=T)
    return Target(
        lm,
        prompts=[few_shot_prompt(p.query, shots) for p in problems],
        potential=ArithmeticPotential(form, beta),
        max_new_tokens=T,
        stop_token_ids=newline_token_ids(lm),
        extras={SOLUTION_KEY: [p.solution for p in problems]},
        tool=CalculatorTool() if tool else None,
    )


def answer_sentence(solution: int) -> str:
    """The observation y of the latent form: the text after the rationale's final "."."""
    return f" The answer is {int(solution)}."


def stop_token_id(lm: ParticleLM) -> int:
    """The token "." that ends a rationale in the latent form."""
    ids = lm.tokenize(".")
    if len(ids) != 1:
        raise ConfigError(f"model {lm.name!r} has no single '.' token (the latent form needs one)")
    return ids[0]


def latent_target(lm: ParticleLM, problems, *, shots: int, tool: bool, max_new_tokens: int) -> Target:
    """σ(z) ∝ p0(z "." | x) · p0(" The answer is y." | x, z ".") over rationales z (the GFlowNet paper's reward).

    The completion z is the calculator-style steps up to and including the stop token "."; the answer sentence is
    the observation of an :class:`~twistlm.potentials.InfillingPotential`, one per problem."""
    return Target(
        lm,
        prompts=[few_shot_prompt(p.query, shots) for p in problems],
        potential=InfillingPotential(lm),
        max_new_tokens=max_new_tokens,
        stop_at_eos=False,
        stop_token_ids=(stop_token_id(lm),),
        extras={
            SOLUTION_KEY: [p.solution for p in problems],
            OBSERVATION_KEY: [answer_sentence(p.solution) for p in problems],
        },
        tool=CalculatorTool() if tool else None,
    )


def is_correct(completion: str, solution: int) -> bool:
    """Whether the calculator-read answer of ``completion`` equals ``solution``."""
    return arithmetic_answer(completion) == int(solution)


def success(target: Target, texts: list[str], prompt_index: list[int]) -> list[bool]:
    """The goal: the answer (read through the calculator) is the problem's num_sol."""
    solutions = target.extras[SOLUTION_KEY]
    return [is_correct(t, solutions[b]) for t, b in zip(texts, prompt_index)]


def read_answers(target: Target, texts: list[str], prompt_index: list[int]) -> list[str | None]:
    """Each completion's calculator-read answer (:func:`arithmetic_answer`) as a string; None without one."""
    return [None if (a := arithmetic_answer(t)) is None else str(a) for t in texts]


def gold_answers(target: Target) -> list[str]:
    """num_sol of each prompt, as a string."""
    return [str(int(y)) for y in target.extras[SOLUTION_KEY]]


def problem_count(*, data: str | None, exclude: str | None = None, **_: object) -> int:
    """Problems in the data file, less the excluded queries (or the built-in list without one)."""
    return len(BUILTIN_PROBLEMS) if data is None else len(held_out(data, exclude))


ANSWERS = Answers(read=read_answers, gold=gold_answers, count=problem_count)

TASK = define_task(
    "arithmetic",
    "1-digit +/- problems (GFlowNet paper), few-shot; answers read through a calculator; φ = 1 if correct.",
    OPTIONS,
    build,
    DEFAULT_MAX_NEW_TOKENS,
    success,
    answer=ANSWERS,
)
