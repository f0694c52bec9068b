"""Tests for the data loaders: the real files in ../shared/data and malformed files written to tmp_path."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from twistlm.data import (
    SUBJ_LABEL_NAMES,
    ArithmeticExample,
    Story,
    load_arithmetic,
    load_gsm8k,
    load_gsm8k_hf,
    load_prompts,
    load_storycloze,
    load_subj,
)
from twistlm.errors import ConfigError, DataError

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"

GSM8K_COUNT = 7473
SUBJ_COUNT = 8000
SUBJ_SMALL_COUNTS = {"train.10.jsonl": 10, "train.20.jsonl": 20, "train.50.jsonl": 50}
STORY_COUNT = 1571
PROMPT_COUNT = 10000
ARITHMETIC_COUNTS = {"train_50.json": 50, "homework.json": 1000, "test_3op.json": 500, "test_4op.json": 500}


def _data(*parts: str) -> Path:
    path = DATA_DIR.joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


# ----- real files -----


def test_gsm8k_real() -> None:
    examples = load_gsm8k(_data("gsm8k", "train.jsonl"))
    assert len(examples) == GSM8K_COUNT
    assert examples[0].gold == "72"
    assert examples[0].question.startswith("Natalia sold clips")
    assert all("," not in e.gold for e in examples)
    assert any(e.gold.startswith("-") for e in examples)
    assert len(load_gsm8k(_data("gsm8k", "train.jsonl"), limit=5)) == 5


@pytest.mark.parametrize(("name", "count"), sorted(ARITHMETIC_COUNTS.items()))
def test_arithmetic_real(name: str, count: int) -> None:
    examples = load_arithmetic(_data("arithmetic", name))
    assert len(examples) == count
    assert all(isinstance(e.solution, int) for e in examples)
    if name == "train_50.json":
        assert examples[0] == ArithmeticExample(
            query="Question: 6 - 0 - 4 - 8 = ? Answer:",
            solution=-6,
            rationale="6 - 0 =, 6 - 4 =, 2 - 8 =",
            solution_text=". The answer is -6.",
        )
    if name.startswith("test_"):
        assert all(e.rationale is None and e.solution_text is None for e in examples)


def test_subj_real() -> None:
    examples = load_subj(_data("subj", "train.jsonl"))
    assert len(examples) == SUBJ_COUNT
    assert {e.label for e in examples} == {0, 1}
    assert all(e.label_name == SUBJ_LABEL_NAMES[e.label] for e in examples)
    for name, count in SUBJ_SMALL_COUNTS.items():
        assert len(load_subj(_data("subj", name))) == count


def test_storycloze_real() -> None:
    stories = load_storycloze(_data("stories", "storycloze_val.csv"))
    assert len(stories) == STORY_COUNT
    assert stories[0] == Story(
        beginning=(
            "Rick grew up in a troubled household.",
            "He never found good support in family, and turned to gangs.",
            "It wasn't long before Rick got shot in a robbery.",
        ),
        middle="The incident caused him to turn a new leaf.",
        ending="He is happy now.",
        wrong_ending="He joined a gang.",
    )
    assert all(len(s.beginning) == 3 for s in stories)


def test_prompts_real() -> None:
    prompts = load_prompts(_data("prompts", "openwebtext.txt"))
    assert len(prompts) == PROMPT_COUNT
    assert all(p and p == p.strip() for p in prompts)
    assert load_prompts(_data("prompts", "openwebtext.txt"), limit=3) == prompts[:3]


# ----- malformed files -----

GOOD_GSM8K = {"question": "q?", "answer": "so\n#### 1,234"}


def _lines(*lines: str) -> str:
    return "".join(f"{line}\n" for line in lines)


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text(_lines(*lines), encoding="utf-8")
    return path


def test_gsm8k_bad_json_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps(GOOD_GSM8K)
    path = _write_jsonl(tmp_path / "broken.jsonl", [good, good, '{"question": "q", ', good])
    with pytest.raises(DataError, match=r"broken\.jsonl, line 3: invalid JSON"):
        load_gsm8k(path)
    assert load_gsm8k(path, limit=2)[1].gold == "1234"  # the limit stops before the bad line


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"question": "q"}, "missing field 'answer'"),
        ({"question": 3, "answer": "#### 1"}, "field 'question' must be str"),
        ({"question": "q", "answer": "no marker"}, "no '####'"),
        ({"question": "q", "answer": "#### twelve"}, "not a number"),
    ],
)
def test_gsm8k_bad_records(tmp_path: Path, record: dict[str, object], problem: str) -> None:
    path = _write_jsonl(tmp_path / "g.jsonl", [json.dumps(GOOD_GSM8K), "", json.dumps(record)])
    with pytest.raises(DataError, match=r"g\.jsonl, line 3: ") as info:
        load_gsm8k(path)
    assert problem in str(info.value)


def test_jsonl_line_must_be_an_object(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "s.jsonl", ['{"text": "t", "label": 0}', "[1, 2]"])
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        load_subj(path)


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ({"text": "t"}, "missing field 'label'"),
        ({"text": "t", "label": True}, "must be int"),
        ({"text": "t", "label": 2}, "label must be 0"),
        ({"text": "t", "label": 1, "label_text": "objective"}, "label_text"),
    ],
)
def test_subj_bad_records(tmp_path: Path, record: dict[str, object], problem: str) -> None:
    path = _write_jsonl(
        tmp_path / "s.jsonl", ['{"text": "t", "label": 0, "label_text": "objective"}', json.dumps(record)]
    )
    with pytest.raises(DataError, match=r"s\.jsonl, line 2: ") as info:
        load_subj(path)
    assert problem in str(info.value)


def test_arithmetic_errors_name_the_line(tmp_path: Path) -> None:
    good = '    {"str_query": "1 + 2 = ?", "num_sol": 3},'
    path = tmp_path / "a.json"
    path.write_text(_lines("[", good, good, '    {"str_query": "1 + 1 = ?"}', "]"), encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json, line 4: missing field 'num_sol'"):
        load_arithmetic(path)
    path.write_text(_lines("[", good, good, '    {"str_query": "x", "num_sol": 1.5}', "]"), encoding="utf-8")
    with pytest.raises(DataError, match=r"line 4: field 'num_sol' must be int"):
        load_arithmetic(path)
    path.write_text(_lines("[", good, '    {"str_query": oops},', "]"), encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json, line 3: invalid JSON"):
        load_arithmetic(path)
    path.write_text('{"str_query": "x", "num_sol": 1}', encoding="utf-8")
    with pytest.raises(DataError, match="expected a JSON array"):
        load_arithmetic(path)
    path.write_text("[]", encoding="utf-8")
    assert load_arithmetic(path) == []


STORY_HEADER = (
    "InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
    "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding"
)


def test_storycloze_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    good = "A.,B.,C.,D.,Right.,Wrong.,1"
    path.write_text(_lines(STORY_HEADER, good, "A.,B.,C.,D.,E.,F.,3"), encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.csv, line 3: AnswerRightEnding must be 1 or 2"):
        load_storycloze(path)
    path.write_text(_lines(STORY_HEADER, good, good, "A.,B.,C."), encoding="utf-8")
    with pytest.raises(DataError, match=r"line 4: fewer fields"):
        load_storycloze(path)
    path.write_text(_lines(STORY_HEADER, good + ",extra"), encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: more fields"):
        load_storycloze(path)
    path.write_text(_lines("a,b,c", good), encoding="utf-8")
    with pytest.raises(DataError, match=r"line 1: header lacks"):
        load_storycloze(path)
    path.write_text(_lines(STORY_HEADER, "A.,B.,C.,D.,Wrong.,Right.,2"), encoding="utf-8")
    assert load_storycloze(path) == [Story(("A.", "B.", "C."), "D.", "Right.", "Wrong.")]


def test_prompts_skip_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("  one \n\n   \ntwo\n", encoding="utf-8")
    assert load_prompts(path) == ["one", "two"]


@pytest.mark.parametrize("loader", [load_gsm8k, load_arithmetic, load_subj, load_storycloze, load_prompts])
def test_missing_file_and_bad_limit(tmp_path: Path, loader: object) -> None:
    missing = tmp_path / "nowhere.txt"
    with pytest.raises(DataError, match=r"nowhere\.txt: no such file"):
        loader(missing)  # type: ignore[operator]
    with pytest.raises(ConfigError, match="limit"):
        loader(missing, limit=-1)  # type: ignore[operator]


def test_gsm8k_hf_without_datasets_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        load_gsm8k_hf()
