"""Data set loaders: known rows of each built-in set, where each is read from, user JSONL files, bad data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import DATA, ROOT, needs_full_data

from tora.data import DATASETS, PACKAGED, load_problems, source_path
from tora.errors import DataError

# The sets shipped in tora/datasets/ (MIT) and the sha256 of the upstream files they copy.
SHIPPED = {
    "gsm8k": "9f098df7ff4522078d6ccec27a5c38a454790fdb51131bedfaa0e490070d5394",
    "math": "3371949f33dd702d04b43fddd7d53a028de0aaca0e76abb1b875a050297b3aa4",
    "math500": "35dc41080a3680858b27fa7e0533d2d547825316fc5dafe5d316f4ccc5a06132",
    "gsm-hard": "45db606263a4902580aba3974e8b7fb3f66012877889209af206b1c1b2f208f5",
    "svamp": "d0826ff1264f3860e46fc4e71db9e31d2d188960db87090e22677f9493e67a0d",
}
NOT_SHIPPED = {"asdiv": "CC BY-NC 4.0", "mawps": "no license upstream",
               **dict.fromkeys(("aime24", "amc23", "minerva_math", "olympiadbench"), "competition problems")}
COMPETITION = Path(__file__).parent / "data" / "competition"  # their first rows (see its README.md)

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
    "aime24": (30, 0, "60", "Every morning Aya goes for a $9$-kilometer-long wa",
               "the $t$ minutes spent in the coffee shop.", "204"),
    "amc23": (40, 0, "0", "Cities $A$ and $B$ are $45$ miles apart.", "from City $A$ will they be when they meet?", "27"),
    "minerva_math": (272, 0, "0", "Each of the two Magellan telescopes has a diameter",
                     "at the time of the observation is $45^{\\prime \\prime}$.", "1.6"),
    "olympiadbench": (675, 0, "1606", "Xenia and Sergey play the following game.",
                      "determine for sure the number Xenia thought of?", "2"),
}


def _available(name: str) -> None:
    if name in NOT_SHIPPED and not (DATA / name / "test.jsonl").is_file():
        pytest.skip(f"{name} is not shipped ({NOT_SHIPPED[name]}) and {DATA} does not hold it")


@pytest.mark.parametrize("name", DATASETS)
def test_known_row(name: str) -> None:
    _available(name)
    rows, index, pid, start, end, answer = KNOWN[name]
    problems = load_problems(name)
    assert len(problems) == rows
    p = problems[index]
    assert (p.id, p.answer, p.source) == (pid, answer, name)
    assert p.text.startswith(start) and p.text.endswith(end)
    assert len({q.id for q in problems}) == rows  # ids are unique


def test_competition_sets_are_read_as_qwen25_math_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORA_DATA_DIR", str(COMPETITION))
    aime = load_problems("aime24")
    assert [(p.id, p.answer, p.source, p.split) for p in aime] == [("60", "204", "aime24", "test"),
                                                                   ("61", "113", "aime24", "test")]
    amc = load_problems("amc23")
    assert [(p.id, p.answer) for p in amc] == [("0", "27"), ("1", "36")]  # 27.0 in the file
    minerva = load_problems("minerva_math")[0]
    assert (minerva.id, minerva.answer, minerva.source) == ("0", "1.6", "minerva_math")
    assert minerva.meta["type"] == "Introduction to Astronomy (8.282J Spring 2006)"
    olympiad = load_problems("olympiadbench")
    # final_answer[0] without its $...$; the unit is kept apart, not in the answer.
    assert [p.answer for p in olympiad] == ["2", "\\frac{1}{2 n+2}",
                                            "\\angle B E A_{1}=90$,$\\angle A E B_{1}=90"]
    assert olympiad[0].meta == {"answer_type": "Numerical", "type": "Combinatorics"}
    assert olympiad[2].meta["unit"] == "^{\\circ}"
    assert all(p.text.strip() for p in olympiad)


def test_a_competition_set_without_its_data_says_where_to_put_it(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import tora.data

    monkeypatch.setenv("TORA_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(tora.data, "data_dirs", lambda: [tmp_path, PACKAGED])
    with pytest.raises(DataError, match=r"not shipped with tora \(competition problems.*TORA_DATA_DIR/aime24/test.jsonl"):
        load_problems("aime24")


def test_meta_level_type_subject() -> None:
    math = load_problems("math", limit=1)[0]
    assert math.meta == {"level": 3, "type": "Algebra"}
    m500 = load_problems("math500", limit=1)[0]
    assert m500.meta == {"level": 2, "subject": "Precalculus", "type": "Precalculus"}


def test_mawps_type() -> None:
    _available("mawps")
    assert load_problems("mawps", limit=1)[0].meta == {"type": "singleeq"}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_copy_is_the_upstream_file_with_its_license(name: str) -> None:
    copy = PACKAGED / name / "test.jsonl"
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == SHIPPED[name]
    license_text = (PACKAGED / name / "LICENSE").read_text()
    assert "MIT License" in license_text and "Permission is hereby granted" in license_text
    assert SHIPPED[name] in (PACKAGED / "README.md").read_text()


@pytest.mark.parametrize("name", NOT_SHIPPED)
def test_unshipped_sets_are_not_in_the_package(name: str) -> None:
    assert not (PACKAGED / name).exists()


@needs_full_data(ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl")
def test_local_data_folder_is_read_before_the_shipped_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TORA_DATA_DIR", raising=False)
    monkeypatch.chdir(ROOT)  # ../shared/data is then beside both the checkout and the current directory
    assert source_path("gsm8k") == (ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl").resolve()


def test_tora_data_dir_wins_and_a_set_it_lacks_comes_from_the_next_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "svamp").mkdir()
    mine = tmp_path / "svamp" / "test.jsonl"
    mine.write_text(json.dumps({"Body": "A has 2 apples", "Question": "How many?", "Answer": 2.0, "idx": 9}) + "\n")
    monkeypatch.setenv("TORA_DATA_DIR", str(tmp_path))
    assert source_path("svamp") == mine.resolve()
    assert [(p.id, p.text, p.answer) for p in load_problems("svamp")] == [("9", "A has 2 apples. How many?", "2")]
    gsm8k = source_path("gsm8k")  # not in TORA_DATA_DIR: the local data folder, else the shipped copy
    local = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    assert gsm8k in {local.resolve(), (PACKAGED / "gsm8k" / "test.jsonl").resolve()}
    assert hashlib.sha256(gsm8k.read_bytes()).hexdigest() == SHIPPED["gsm8k"]


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


@pytest.mark.parametrize("name", NOT_SHIPPED)
def test_missing_unshipped_set_says_where_to_put_it(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if any((d / name / "test.jsonl").is_file() for d in (ROOT.parent / "shared" / "data", tmp_path.parent / "shared" / "data")):
        pytest.skip(f"a local data folder holds {name}")
    monkeypatch.setenv("TORA_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        load_problems(name)
    message = str(info.value)
    assert f"$TORA_DATA_DIR/{name}/test.jsonl" in message and NOT_SHIPPED[name] in message
    assert message.startswith(f"{name}: data set not found") and "\n" not in message
