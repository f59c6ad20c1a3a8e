"""Data set loaders: known rows of each shared set, user JSONL files, bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tora.data import DATASETS, load_problems
from tora.errors import DataError

KNOWN = {
    # name: (rows, index of a known row, id, start of text, end of text, answer)
    "gsm8k": (1319, 0, "0", "Janet’s ducks lay 16 eggs per day.", "at the farmers' market?", "18"),
    "math": (5000, 0, "0", "How many vertical asymptotes", "have?", "2"),
    "math500": (500, 0, "test/precalculus/807.json", "Convert the point $(0,3)$", "2 \\pi.$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    "gsm-hard": (1319, 0, "0", "Janet’s ducks lay 16 eggs per day.", "at the farmers' market?", "-9867630"),
    "svamp": (
        1000,
        0,
        "0",
        "There are 87 oranges and 290 bananas",
        "organized into 93 groups. How big is each group of bananas?",
        "145",
    ),
    "asdiv": (
        2215,
        0,
        "0",
        "Seven red apples and two green apples are in the basket. How many",
        "are in the basket?",
        "9",
    ),
    "mawps": (2065, 0, "0", "Joan found 70 seashells on the beach.", "did she give to Sam ?", "43"),
}


@pytest.mark.parametrize("name", DATASETS)
def test_known_row(name: str) -> None:
    rows, index, pid, start, end, answer = KNOWN[name]
    problems = load_problems(name)
    assert len(problems) == rows
    p = problems[index]
    assert (p.id, p.answer, p.source) == (pid, answer, name)
    assert p.text.startswith(start) and p.text.endswith(end)
    assert len({q.id for q in problems}) == rows  # ids are unique


def test_meta_level_type_subject() -> None:
    math = load_problems("math", limit=1)[0]
    assert math.meta == {"level": 3, "type": "Algebra"}
    m500 = load_problems("math500", limit=1)[0]
    assert m500.meta == {"level": 2, "subject": "Precalculus", "type": "Precalculus"}
    assert load_problems("mawps", limit=1)[0].meta == {"type": "singleeq"}


def test_numbers_keep_their_value() -> None:
    hard = load_problems("gsm-hard", limit=2)
    assert hard[1].answer == "3431580"
    decimals = [p.answer for p in load_problems("gsm-hard") if p.answer and "." in p.answer]
    assert "3244047.0999999996" in decimals


def test_gsm8k_thousands_kept_as_written() -> None:
    assert load_problems("gsm8k")[146].answer == "2,125"


def test_limit() -> None:
    assert [p.id for p in load_problems("gsm8k", limit=3)] == ["0", "1", "2"]
    assert load_problems("math", limit=0) == []


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_user_jsonl_with_fields(tmp_path: Path) -> None:
    f = _write(
        tmp_path / "mine.jsonl",
        [json.dumps({"q": "What is 2+2?", "a": 4, "key": "p1", "level": "Level 2"}), "", json.dumps({"q": "1+1?", "a": "2", "key": 7})],
    )
    problems = load_problems(f, question_field="q", answer_field="a", id_field="key")
    assert [(p.id, p.text, p.answer) for p in problems] == [("p1", "What is 2+2?", "4"), ("7", "1+1?", "2")]
    assert problems[0].meta == {"level": 2}


def test_user_jsonl_guesses_common_fields(tmp_path: Path) -> None:
    f = _write(tmp_path / "guess.jsonl", [json.dumps({"problem": "x?", "answer": "1"}), json.dumps({"problem": "y?"})])
    problems = load_problems(f)
    assert [(p.id, p.text, p.answer) for p in problems] == [("guess-1", "x?", "1"), ("guess-2", "y?", None)]


@pytest.mark.parametrize(
    ("lines", "kwargs", "where"),
    [
        ([json.dumps({"question": "a", "answer": "1"}), "{not json"], {}, ":2:"),
        ([json.dumps({"question": "a", "answer": "1"}), "[1, 2]"], {}, ":2:"),
        ([json.dumps({"question": "a", "answer": "1"}), json.dumps({"answer": "2"})], {}, ":2: field 'question'"),
        ([json.dumps({"q": "a", "a": "1"}), json.dumps({"q": "b"})], {"question_field": "q", "answer_field": "a"}, ":2: field 'a'"),
        ([json.dumps({"question": "", "answer": "1"})], {}, ":1: field 'question'"),
        ([json.dumps({"question": {"t": 1}, "answer": "1"})], {}, ":1: field 'question'"),
    ],
)
def test_bad_jsonl_names_file_line_field(tmp_path: Path, lines: list[str], kwargs: dict[str, str], where: str) -> None:
    f = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_problems(f, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{f}{where}"), message
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_bad_builtin_file_via_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gsm8k").mkdir()
    good = {"question": "q", "answer": "because #### 5", "idx": 0}
    bad = {"question": "q", "answer": "no marker", "idx": 1}
    f = _write(tmp_path / "gsm8k" / "test.jsonl", [json.dumps(good), json.dumps(bad)])
    monkeypatch.setenv("TORA_DATA_DIR", str(tmp_path))
    assert load_problems("gsm8k", limit=1)[0].answer == "5"
    with pytest.raises(DataError, match=rf"^{f}:2: field 'answer'"):
        load_problems("gsm8k")


def test_unknown_name_or_missing_file() -> None:
    with pytest.raises(DataError, match="not a data set name"):
        load_problems("gsm9k")


def test_missing_builtin_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORA_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="TORA_DATA_DIR"):
        load_problems("svamp")
