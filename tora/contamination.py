"""The contamination guard: word n-gram overlap of training problems with evaluation sets.

Text is normalised (Unicode NFKC, lower case, runs of letters and digits as
words; LaTeX markup and punctuation fall away), then cut into word n-grams.
A problem's overlap is the fraction of its n-grams found in any evaluation
problem; at or above the threshold it is flagged, with the evaluation
problem that shares most of them. A text shorter than n words is one n-gram
of all its words, so it matches only an evaluation problem that is the same
short text.

The index is built once per run and is vectorised: all texts are normalised
and split in one pass (joined by NUL, which no word contains), each word
becomes its Python string hash (the index lives in one process and is never
stored, so the per-process hash salt does not matter), each n-gram a
polynomial of its words' hashes mod 2**64, and the index a sorted array
probed with `searchsorted`. `benchmarks/bench_contamination.py` measures it
on 100k problems, beside a plain-Python set of word tuples.
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
_WORD_OR_SEP = re.compile(r"[^\W_]+|\x00")
_SEP = hash("\x00")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2**64

U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]


def words(text: str) -> list[str]:
    """The normalised words of a text (what the n-grams are made of)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _tokens(texts: Sequence[str]) -> tuple[U64, I64]:
    """Every word of every text as its hash, and the text it belongs to."""
    joined = "\x00".join(t.replace("\x00", " ") for t in texts)
    found = _WORD_OR_SEP.findall(unicodedata.normalize("NFKC", joined).lower())
    hashes = np.fromiter(map(hash, found), dtype=np.int64, count=len(found))
    sep = hashes == _SEP
    doc = np.cumsum(sep)
    keep = ~sep
    return hashes[keep].view(np.uint64), doc[keep]


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

    def __init__(self, problems: Sequence[Problem], n: int = DEFAULT_N) -> None:
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.problems = list(problems)
        grams, owners, _ = self._grams_of([p.text for p in self.problems])
        order = np.argsort(grams, kind="stable")
        self._grams: U64 = grams[order]
        self._owners: I64 = owners[order]

    def __len__(self) -> int:
        return len(self._grams)

    def _grams_of(self, texts: Sequence[str]) -> tuple[U64, I64, I64]:
        """Every n-gram hash of every text, the text it belongs to, and each text's n-gram count.

        A text of at least n words has len - n + 1 grams (the windows of a
        rolling polynomial that lie inside it); a shorter one has one gram of
        all its words, salted by its length.
        """
        n = self.n
        values, doc = _tokens(texts)
        lengths = np.bincount(doc, minlength=len(texts)).astype(np.int64)
        counts = np.where(lengths >= n, lengths - n + 1, np.minimum(lengths, 1))
        hashes: list[U64] = [np.zeros(0, np.uint64)]
        owners: list[I64] = [np.zeros(0, np.int64)]
        if len(values) >= n:
            windows = len(values) - n + 1
            h = np.zeros(windows, dtype=np.uint64)
            with np.errstate(over="ignore"):
                for j in range(n):
                    h = h * _MULT + values[j : j + windows]
            inside = doc[:windows] == doc[n - 1 :]
            hashes.append(h[inside])
            owners.append(doc[:windows][inside])
        short = np.nonzero((lengths > 0) & (lengths < n))[0]
        if len(short):
            starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
            with np.errstate(over="ignore"):
                for d in short:
                    h0 = np.uint64(int(lengths[d]))
                    for v in values[starts[d] : starts[d] + lengths[d]]:
                        h0 = h0 * _MULT + v
                    hashes.append(np.array([h0], dtype=np.uint64))
            owners.append(short.astype(np.int64))
        return np.concatenate(hashes), np.concatenate(owners), counts

    def check(self, problems: Sequence[Problem], threshold: float = DEFAULT_THRESHOLD) -> list[Overlap]:
        """The problems whose overlap is at least `threshold`, in input order."""
        grams, owner_doc, totals = self._grams_of([p.text for p in problems])
        if not len(grams) or not len(self._grams):
            return []
        # Probing in sorted order walks the index once instead of jumping about it (3x faster).
        order = np.argsort(grams)
        at = np.empty(len(grams), dtype=np.int64)
        at[order] = np.searchsorted(self._grams, grams[order])
        at = np.minimum(at, len(self._grams) - 1)
        hit = self._grams[at] == grams
        found = np.nonzero(hit)[0]
        docs_hit = owner_doc[found]
        matched = np.bincount(docs_hit, minlength=len(problems))
        # For each flagged problem, which evaluation problem its shared grams come from.
        by_doc = np.argsort(docs_hit, kind="stable")
        docs_hit, sources = docs_hit[by_doc], self._owners[at[found[by_doc]]]
        first = np.searchsorted(docs_hit, np.arange(len(problems) + 1))
        flagged: list[Overlap] = []
        for d in np.nonzero(matched > 0)[0]:
            frac = float(matched[d]) / float(totals[d])
            if frac < threshold:
                continue
            best = int(np.bincount(sources[first[d] : first[d + 1]]).argmax())
            flagged.append(Overlap(problems[int(d)], frac, int(totals[d]), self.problems[best]))
        return flagged
