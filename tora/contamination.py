"""The contamination guard: word n-gram overlap of training problems with evaluation sets.

Text is normalised (Unicode NFKC, lower case, runs of letters and digits as
words; LaTeX markup and punctuation fall away), then cut into word n-grams.
A problem's overlap is the fraction of its n-grams found in any evaluation
problem; at or above the threshold it is flagged, with the evaluation
problem that shares most of them. A text shorter than n words is one n-gram
of all its words, so it matches only an evaluation problem that is the same
short text.

The index is built once per run, vectorised: each word becomes a random
64-bit value (by a dictionary built from the evaluation texts: a word absent
from them cannot be in a shared n-gram), each n-gram a polynomial hash of
its words' values, and the index a sorted array probed with `searchsorted`.
`benchmarks/bench_contamination.py` measures it on 100k problems.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tora.record.schema import Problem

DEFAULT_N = 10
DEFAULT_THRESHOLD = 0.5
_WORD = re.compile(r"[^\W_]+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2**64
_UNKNOWN = -1

U64 = npt.NDArray[np.uint64]


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


@dataclass(frozen=True)
class Overlap:
    problem: Problem
    overlap: float  # fraction of the problem's n-grams found in the evaluation sets
    grams: int
    match: Problem  # the evaluation problem sharing the most n-grams

    def row(self) -> dict[str, object]:
        return {
            "problem_id": self.problem.id,
            "overlap": round(self.overlap, 4),
            "ngrams": self.grams,
            "eval_source": self.match.source,
            "eval_id": self.match.id,
            "problem": self.problem.text,
            "eval_problem": self.match.text,
        }


class NgramIndex:
    """The n-grams of a set of evaluation problems, for overlap queries."""

    def __init__(self, problems: Sequence[Problem], n: int = DEFAULT_N, seed: int = 0) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.problems = list(problems)
        self._vocab: dict[str, int] = {}
        ids = [self._ids(words(p.text), grow=True) for p in self.problems]
        rng = np.random.default_rng(seed)
        self._values: U64 = rng.integers(0, np.iinfo(np.uint64).max, size=max(1, len(self._vocab)),
                                         dtype=np.uint64, endpoint=True)
        grams, owners = self._hash_all(ids)
        order = np.argsort(grams, kind="stable")
        self._grams: U64 = grams[order]
        self._owners: npt.NDArray[np.int64] = owners[order]

    def __len__(self) -> int:
        return len(self._grams)

    def _ids(self, found: list[str], grow: bool) -> list[int]:
        if grow:
            vocab = self._vocab
            return [vocab.setdefault(w, len(vocab)) for w in found]
        get = self._vocab.get
        return [get(w, _UNKNOWN) for w in found]

    def _hash_all(self, docs: Sequence[list[int]]) -> tuple[U64, npt.NDArray[np.int64]]:
        """Every n-gram hash of every document, with the document it belongs to.

        Grams holding an unknown word get no hash (they cannot match): they
        are counted by `check` but not returned here.
        """
        n = self.n
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        if not len(docs) or not lengths.sum():
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        flat = np.fromiter((i for d in docs for i in d), dtype=np.int64, count=int(lengths.sum()))
        known = flat != _UNKNOWN
        values = np.where(known, self._values[np.where(known, flat, 0)], np.uint64(0))
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        doc_of = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
        hashes: list[U64] = [np.zeros(0, np.uint64)]
        owners: list[npt.NDArray[np.int64]] = [np.zeros(0, np.int64)]
        # Documents of at least n words: a rolling polynomial over the flat array,
        # keeping the windows that lie inside one document and hold known words only.
        if len(flat) >= n:
            windows = len(flat) - n + 1
            h = np.zeros(windows, dtype=np.uint64)
            bad = np.zeros(windows, dtype=bool)
            with np.errstate(over="ignore"):
                for j in range(n):
                    h = h * _MULT + values[j : j + windows]
                    bad |= ~known[j : j + windows]
            pos = np.arange(windows)
            inside = (pos + n - 1) < (starts[doc_of[:windows]] + lengths[doc_of[:windows]])
            ok = inside & ~bad
            hashes.append(h[ok])
            owners.append(doc_of[:windows][ok])
        # Shorter documents: one gram of all their words, salted by its length.
        for d in np.nonzero((lengths > 0) & (lengths < n))[0]:
            seg = slice(int(starts[d]), int(starts[d] + lengths[d]))
            if not known[seg].all():
                continue
            h0 = np.uint64(int(lengths[d]))
            with np.errstate(over="ignore"):
                for v in values[seg]:
                    h0 = h0 * _MULT + v
            hashes.append(np.array([h0], dtype=np.uint64))
            owners.append(np.array([d], dtype=np.int64))
        return np.concatenate(hashes), np.concatenate(owners)

    def _gram_counts(self, docs: Sequence[list[int]]) -> npt.NDArray[np.int64]:
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        return np.where(lengths >= self.n, lengths - self.n + 1, np.minimum(lengths, 1))

    def check(self, problems: Sequence[Problem], threshold: float = DEFAULT_THRESHOLD) -> list[Overlap]:
        """The problems whose overlap is at least `threshold`, in input order."""
        docs = [self._ids(words(p.text), grow=False) for p in problems]
        totals = self._gram_counts(docs)
        grams, owner_doc = self._hash_all(docs)
        if not len(grams) or not len(self._grams):
            return []
        at = np.searchsorted(self._grams, grams)
        at = np.minimum(at, len(self._grams) - 1)
        hit = self._grams[at] == grams
        found = np.nonzero(hit)[0]
        docs_hit = owner_doc[found]
        matched = np.bincount(docs_hit, minlength=len(problems))
        # For each flagged problem, which evaluation problem its shared grams come from.
        order = np.argsort(docs_hit, kind="stable")
        docs_hit, sources = docs_hit[order], self._owners[at[found[order]]]
        first = np.searchsorted(docs_hit, np.arange(len(problems) + 1))
        flagged: list[Overlap] = []
        for d in np.nonzero(matched > 0)[0]:
            frac = float(matched[d]) / float(totals[d])
            if frac < threshold:
                continue
            best = int(np.bincount(sources[first[d] : first[d + 1]]).argmax())
            flagged.append(Overlap(problems[int(d)], frac, int(totals[d]), self.problems[best]))
        return flagged
