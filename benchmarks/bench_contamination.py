"""The contamination guard's n-gram index at training-set scale, against a plain-Python one.

    .venv/bin/python benchmarks/bench_contamination.py [--problems 100000] [--n 10]

Builds the index over every built-in evaluation set found (TORA_DATA_DIR or
../shared/data) and checks `--problems` synthetic training problems against
it (words drawn from the evaluation sets' own vocabulary, 20 to 120 words,
1 % near copies of evaluation problems); then builds an index over the
100k problems themselves. The same work with Python sets of word tuples
runs beside it, and the two must flag the same problems.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from paced import load_average, rss_mb

from tora.contamination import NgramIndex, words
from tora.data import DATASETS, dataset_path, load_problems
from tora.record import Problem


def synthetic(evals: list[Problem], count: int, seed: int) -> list[Problem]:
    rng = random.Random(seed)
    vocab = sorted({w for p in evals[:2000] for w in words(p.text)})
    out = []
    for i in range(count):
        if i % 100 == 0:
            base = rng.choice(evals).text.split()
            base[rng.randrange(len(base))] = "changed"
            text = " ".join(base)
        else:
            text = " ".join(rng.choices(vocab, k=rng.randint(20, 120)))
        out.append(Problem(id=f"t{i}", text=text))
    return out


def naive(evals: list[Problem], problems: list[Problem], n: int, threshold: float) -> tuple[set[str], float, float]:
    def grams(text: str) -> list[tuple[str, ...]]:
        w = words(text)
        return [tuple(w)] if 0 < len(w) < n else [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]

    t0 = time.perf_counter()
    index = {g for p in evals for g in grams(p.text)}
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    flagged = set()
    for p in problems:
        mine = grams(p.text)
        if mine and sum(g in index for g in mine) / len(mine) >= threshold:
            flagged.add(p.id)
    return flagged, built, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(load_average(), flush=True)
    t0 = time.perf_counter()
    sets = [d for d in DATASETS if (path := dataset_path(d)) is not None and path.is_file()]
    evals = [p for name in sets for p in load_problems(name)]
    if not evals:
        sys.exit("no evaluation set found: set TORA_DATA_DIR to the shared data folder")
    print(f"loaded {len(evals)} evaluation problems ({', '.join(sets)}) in {time.perf_counter() - t0:.2f} s")
    problems = synthetic(evals, args.problems, args.seed)
    base = rss_mb()
    t0 = time.perf_counter()
    index = NgramIndex(evals, n=args.n)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = index.check(problems, args.threshold)
    checked = time.perf_counter() - t0
    print(f"tora index: built over {len(evals)} problems ({len(index)} {args.n}-grams) in {built:.2f} s; "
          f"checked {len(problems)} problems in {checked:.2f} s ({len(problems) / checked:,.0f}/s); "
          f"{len(found)} flagged; +{rss_mb() - base:.0f} MB")
    t0 = time.perf_counter()
    big = NgramIndex(problems, n=args.n)
    print(f"tora index over the {len(problems)} problems themselves: {time.perf_counter() - t0:.2f} s, "
          f"{len(big)} {args.n}-grams")
    flagged, naive_built, naive_checked = naive(evals, problems, args.n, args.threshold)
    same = flagged == {o.problem.id for o in found}
    print(f"python sets: built in {naive_built:.2f} s, checked in {naive_checked:.2f} s; "
          f"same verdicts: {same}")
    print(f"ratio (python sets / tora), check: {naive_checked / checked:.1f}x, build + check: "
          f"{(naive_built + naive_checked) / (built + checked):.1f}x")
    print(load_average())
    if not same:
        sys.exit("the two indexes disagree")


if __name__ == "__main__":
    main()
