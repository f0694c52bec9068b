"""Loaders for the task data sets; each takes a path, validates what it reads and returns typed records.

Every problem in a file raises :class:`~twistlm.errors.DataError` naming the file and the 1-based line number and what
is wrong (bad JSON, missing field, wrong type); a missing file raises it naming the path. Every loader takes
``limit``: return at most that many records (None: all; records after the limit are not parsed or checked).

Story Cloze mapping (infilling). A Story Cloze row has four sentences and two candidate fifth sentences, of which
``AnswerRightEnding`` (1 or 2) names the true one. The infilling task observes the beginning and the true ending and
infills the missing middle: beginning = InputSentence1..3, middle = InputSentence4, ending = the right fifth
sentence. The other candidate is kept as ``wrong_ending``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from twistlm.errors import ConfigError, DataError
from twistlm.potentials.gsm8k_rewards import extract_hash_answer

SUBJ_LABEL_NAMES = ("objective", "subjective")
"""SUBJ label l ∈ {0, 1} is named SUBJ_LABEL_NAMES[l]."""

STORY_BEGINNING_COLUMNS = ("InputSentence1", "InputSentence2", "InputSentence3")
STORY_MIDDLE_COLUMN = "InputSentence4"
STORY_ENDING_COLUMNS = ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2")
STORY_ANSWER_COLUMN = "AnswerRightEnding"

GSM8K_HUB_NAME = "openai/gsm8k"
GSM8K_HUB_CONFIG = "main"

_GOLD_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class GSM8KExample:
    """A grade-school math problem; ``gold`` is the number after ``####`` in ``answer``, commas removed."""

    question: str
    answer: str
    gold: str


@dataclass(frozen=True)
class ArithmeticExample:
    """A 1-digit +/- problem. ``rationale``: calculator-style steps ("5 + 9 =, 14 - 3 ="); ``solution_text``: ". The
    answer is 19."."""

    query: str
    solution: int
    rationale: str | None
    solution_text: str | None


@dataclass(frozen=True)
class SubjExample:
    """A movie-review sentence with label 0 (objective) or 1 (subjective)."""

    text: str
    label: int
    label_name: str


@dataclass(frozen=True)
class Story:
    """A Story Cloze story for infilling: sentences 1-3, the 4th sentence (to infill) and the right 5th sentence."""

    beginning: tuple[str, ...]
    middle: str
    ending: str
    wrong_ending: str


# ----- shared helpers -----


def _where(path: Path | str, line: int) -> str:
    return f"{path}, line {line}"


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"limit must be None or a non-negative integer; got {limit!r}")


def _read_text(path: Path | str) -> str:
    """The file's text; DataError naming the path if it is missing, unreadable or not UTF-8."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: cannot read as UTF-8 text: {err}") from err


def _iter_jsonl(path: Path | str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSONL file."""
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{_where(path, number)}: invalid JSON ({err.msg} at column {err.colno})") from err
        if not isinstance(record, dict):
            raise DataError(f"{_where(path, number)}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _iter_json_array(path: Path | str) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line where the element starts, element) for each element of a top-level JSON array."""
    text = _read_text(path)
    decoder = json.JSONDecoder()

    def line_of(index: int) -> int:
        return text.count("\n", 0, index) + 1

    def skip_space(index: int) -> int:
        while index < len(text) and text[index].isspace():
            index += 1
        return index

    index = skip_space(0)
    if index >= len(text) or text[index] != "[":
        raise DataError(f"{_where(path, line_of(index))}: expected a JSON array of objects")
    index = skip_space(index + 1)
    if index < len(text) and text[index] == "]":
        return
    while True:
        start = index
        try:
            element, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError as err:
            raise DataError(f"{_where(path, err.lineno)}: invalid JSON ({err.msg} at column {err.colno})") from err
        yield line_of(start), element
        index = skip_space(index)
        if index < len(text) and text[index] == "]":
            if skip_space(index + 1) != len(text):
                raise DataError(f"{_where(path, line_of(index))}: extra data after the JSON array")
            return
        if index >= len(text) or text[index] != ",":
            raise DataError(f"{_where(path, line_of(index))}: expected ',' or ']' in the JSON array")
        index = skip_space(index + 1)


def _field(record: dict[str, Any], name: str, kind: type, where: str, *, optional: bool = False) -> Any:
    """record[name], checked to be of ``kind`` (bool is never accepted as int); None if optional and absent/null."""
    if name not in record or record[name] is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field {name!r}")
    value = record[name]
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise DataError(f"{where}: field {name!r} must be {kind.__name__}, got {type(value).__name__} {value!r:.60}")
    return value


# ----- GSM8K -----


def _gsm8k_example(record: dict[str, Any], where: str) -> GSM8KExample:
    question = _field(record, "question", str, where)
    answer = _field(record, "answer", str, where)
    gold = extract_hash_answer(answer)
    if gold is None:
        raise DataError(f"{where}: field 'answer' has no '####' followed by the gold number")
    if not _GOLD_NUMBER.fullmatch(gold):
        raise DataError(f"{where}: gold answer after '####' is not a number: {gold!r}")
    return GSM8KExample(question=question, answer=answer, gold=gold)


def load_gsm8k(path: Path | str, limit: int | None = None) -> list[GSM8KExample]:
    """GSM8K from JSONL lines ``{"question": str, "answer": str}``; the answer must contain ``#### <number>``."""
    _check_limit(limit)
    examples: list[GSM8KExample] = []
    for number, record in islice(_iter_jsonl(path), limit):
        examples.append(_gsm8k_example(record, _where(path, number)))
    return examples


def load_gsm8k_hf(
    name: str = GSM8K_HUB_NAME, split: str = "train", config: str = GSM8K_HUB_CONFIG, limit: int | None = None
) -> list[GSM8KExample]:
    """GSM8K from the Hugging Face hub via the optional ``datasets`` package (imported lazily).

    Raises DataError with a clear message if ``datasets`` is not installed or the data set cannot be loaded (offline,
    unknown name or split); rows are validated like :func:`load_gsm8k`'s lines ("row N" instead of "line N").
    """
    _check_limit(limit)
    try:
        # optional dependency, imported only when this loader is used
        import datasets
    except ImportError as err:
        raise DataError(
            f"loading {name!r} from the hub needs the 'datasets' package (pip install datasets); "
            "or download the JSONL and use load_gsm8k(path)"
        ) from err
    try:
        rows = datasets.load_dataset(name, config, split=split)
    # the hub raises many exception types (connection, missing files, bad names): report each as a DataError
    except Exception as err:
        raise DataError(
            f"cannot load {name!r} (config {config!r}, split {split!r}) from the hub: {err}. If offline, "
            "download the JSONL and use load_gsm8k(path)"
        ) from err
    examples: list[GSM8KExample] = []
    for number, record in enumerate(islice(rows, limit), start=1):
        examples.append(_gsm8k_example(dict(record), f"{name} {split}, row {number}"))
    return examples


# ----- arithmetic -----


def load_arithmetic(path: Path | str, limit: int | None = None) -> list[ArithmeticExample]:
    """Arithmetic problems from a JSON array of ``{"str_query", "num_sol", ["str_rationale"], ["str_sol"]}``."""
    _check_limit(limit)
    examples: list[ArithmeticExample] = []
    for number, record in islice(_iter_json_array(path), limit):
        where = _where(path, number)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        examples.append(
            ArithmeticExample(
                query=_field(record, "str_query", str, where),
                solution=_field(record, "num_sol", int, where),
                rationale=_field(record, "str_rationale", str, where, optional=True),
                solution_text=_field(record, "str_sol", str, where, optional=True),
            )
        )
    return examples


# ----- SUBJ -----


def load_subj(path: Path | str, limit: int | None = None) -> list[SubjExample]:
    """SUBJ from JSONL lines ``{"text": str, "label": 0 | 1, ["label_text": "objective" | "subjective"]}``."""
    _check_limit(limit)
    examples: list[SubjExample] = []
    for number, record in islice(_iter_jsonl(path), limit):
        where = _where(path, number)
        text = _field(record, "text", str, where)
        label = _field(record, "label", int, where)
        if label not in range(len(SUBJ_LABEL_NAMES)):
            raise DataError(f"{where}: label must be 0 (objective) or 1 (subjective), got {label}")
        label_name = _field(record, "label_text", str, where, optional=True)
        if label_name is not None and label_name != SUBJ_LABEL_NAMES[label]:
            raise DataError(f"{where}: label {label} is {SUBJ_LABEL_NAMES[label]!r} but label_text is {label_name!r}")
        examples.append(SubjExample(text=text, label=label, label_name=SUBJ_LABEL_NAMES[label]))
    return examples


# ----- Story Cloze -----


def load_storycloze(path: Path | str, limit: int | None = None) -> list[Story]:
    """Story Cloze CSV (header InputSentence1-4, RandomFifthSentenceQuiz1-2, AnswerRightEnding) as infilling stories."""
    _check_limit(limit)
    lines = _read_text(path).splitlines(keepends=True)
    reader = csv.DictReader(lines)
    required = (*STORY_BEGINNING_COLUMNS, STORY_MIDDLE_COLUMN, *STORY_ENDING_COLUMNS, STORY_ANSWER_COLUMN)
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{_where(path, 1)}: header lacks column(s) {missing}")
    stories: list[Story] = []
    try:
        for row in islice(reader, limit):
            stories.append(_story(row, _where(path, reader.line_num)))
    except csv.Error as err:
        raise DataError(f"{_where(path, reader.line_num)}: malformed CSV ({err})") from err
    return stories


def _story(row: dict[str | None, str | list[str] | None], where: str) -> Story:
    if None in row:
        raise DataError(f"{where}: more fields than header columns")
    cells: dict[str, str] = {}
    for column, value in row.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: fewer fields than header columns (no {column!r})")
        if not value.strip():
            raise DataError(f"{where}: column {column!r} is empty")
        cells[str(column)] = value.strip()
    answer = cells[STORY_ANSWER_COLUMN]
    if answer not in ("1", "2"):
        raise DataError(f"{where}: {STORY_ANSWER_COLUMN} must be 1 or 2, got {answer!r}")
    right = int(answer) - 1
    return Story(
        beginning=tuple(cells[c] for c in STORY_BEGINNING_COLUMNS),
        middle=cells[STORY_MIDDLE_COLUMN],
        ending=cells[STORY_ENDING_COLUMNS[right]],
        wrong_ending=cells[STORY_ENDING_COLUMNS[1 - right]],
    )


# ----- prompts -----


def load_prompts(path: Path | str, limit: int | None = None) -> list[str]:
    """One prompt per non-empty line, stripped of surrounding whitespace."""
    _check_limit(limit)
    prompts = [line.strip() for line in _read_text(path).splitlines() if line.strip()]
    return prompts if limit is None else prompts[:limit]
