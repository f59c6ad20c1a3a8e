"""Training and review formats from trajectory records (`tora export`).

Every format is a pure function of `Trajectory` records (see
`tora.export.view` for the shared definitions):

| format | one row / file per | module |
|---|---|---|
| tora, trl, openai, sharegpt | trajectory (JSONL) | `formats` |
| preference, correction | pair of trajectories (JSONL) | `pairs` |
| rl | trajectory with tokens: ids, loss mask, logprobs, reward (JSONL) | `rl` |
| ipynb | trajectory (a notebook file in a folder) | `notebook` |
| parquet | the rows of one JSONL format (`trl` by default) | `writers` |

Failed trajectories (finish `error` or `interrupted`): left out of the
training formats unless asked for (`include_failed`), always in ipynb,
never in preference or correction pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tora.export.view import failed
from tora.record import Trajectory

ROW_FORMATS = ("tora", "trl", "openai", "sharegpt", "preference", "correction", "rl")  # JSONL
FILE_FORMATS = ("ipynb", "parquet")  # need --out
FORMATS = ("tora", "trl", "openai", "sharegpt", "ipynb", "parquet", "preference", "correction", "rl")


@dataclass(frozen=True)
class Selection:
    only_correct: bool = False
    include_failed: bool = False
    finishes: tuple[str, ...] = ()
    dedupe: bool = False
    limit: int | None = None


@dataclass
class Tally:
    read: int = 0
    failed: int = 0  # left out: finish error or interrupted
    filtered: int = 0  # left out by --only-correct / --finish
    duplicates: int = 0
    notes: list[str] = field(default_factory=list)


def select(records: Iterable[Trajectory], sel: Selection, tally: Tally) -> list[Trajectory]:
    kept: list[Trajectory] = []
    seen: set[str] = set()
    for t in records:
        tally.read += 1
        if failed(t) and not sel.include_failed:
            tally.failed += 1
            continue
        if (sel.only_correct and t.result.correct is not True) or (sel.finishes and t.result.finish not in sel.finishes):
            tally.filtered += 1
            continue
        key = t.content_hash or t.compute_content_hash()
        if sel.dedupe and key in seen:
            tally.duplicates += 1
            continue
        seen.add(key)
        kept.append(t)
        if sel.limit is not None and len(kept) >= sel.limit:
            break
    return kept
