"""The contamination guard's n-gram index, checked against a plain-Python count of shared n-grams."""

from __future__ import annotations

import random

import pytest

from tora.contamination import NgramIndex, words
from tora.record import Problem

VOCAB = [f"w{i}" for i in range(60)]


def naive_overlap(text: str, evals: list[str], n: int) -> float:
    """Shared n-grams over the text's n-grams, by brute force (a short text is one gram)."""

    def grams(t: str) -> list[tuple[str, ...]]:
        w = words(t)
        return [tuple(w)] if 0 < len(w) < n else [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]

    index = {g for e in evals for g in grams(e)}
    mine = grams(text)
    return sum(g in index for g in mine) / len(mine) if mine else 0.0


def test_normalisation_ignores_case_punctuation_and_unicode_forms() -> None:
    assert words("Janet’s ducks lay 16 eggs, per DAY!") == ["janet", "s", "ducks", "lay", "16", "eggs", "per", "day"]
    assert words("ﬁve  x_1 $\\frac{3}{4}$") == ["five", "x", "1", "frac", "3", "4"]


def test_overlaps_match_a_brute_force_count() -> None:
    rng = random.Random(4)
    evals = [" ".join(rng.choices(VOCAB, k=rng.randint(3, 40))) for _ in range(60)]
    queries = []
    for _ in range(300):
        if rng.random() < 0.5:  # a mutated copy of an evaluation problem
            base = rng.choice(evals).split()
            for _ in range(rng.randint(0, 3)):
                base[rng.randrange(len(base))] = rng.choice([*VOCAB, "unseen"])
            queries.append(" ".join(base))
        else:
            queries.append(" ".join(rng.choices([*VOCAB, "unseen"], k=rng.randint(1, 40))))
    problems = [Problem(id=str(i), text=q) for i, q in enumerate(queries)]
    for n in (1, 3, 8):
        index = NgramIndex([Problem(id=f"e{i}", text=e, source="eval") for i, e in enumerate(evals)], n=n)
        for threshold in (0.2, 0.5, 1.0):
            found = {o.problem.id: o.overlap for o in index.check(problems, threshold)}
            expected = {p.id: naive_overlap(p.text, evals, n) for p in problems}
            assert found.keys() == {pid for pid, v in expected.items() if v >= threshold}, (n, threshold)
            assert all(found[pid] == pytest.approx(expected[pid]) for pid in found)


def test_the_match_names_the_evaluation_problem_that_shares_most() -> None:
    evals = [Problem(id="near", text="a b c d e f g h i j k l", source="set1"),
             Problem(id="far", text="x y z a b c d", source="set2")]
    index = NgramIndex(evals, n=3)
    (hit,) = index.check([Problem(id="q", text="A, b, c; d e f g h i j k L!")], 0.5)
    assert hit.match.id == "near" and hit.overlap == 1.0 and hit.row()["eval_source"] == "set1"
    assert index.check([Problem(id="q", text="nothing in common at all here")], 0.01) == []
    # A text shorter than n words matches only the same short text.
    short = NgramIndex([Problem(id="s", text="two words")], n=5)
    assert [o.problem.id for o in short.check([Problem(id="1", text="Two  words."), Problem(id="2", text="two")])] == ["1"]
    assert NgramIndex([], n=5).check([Problem(id="1", text="anything")]) == []
