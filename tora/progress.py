"""Progress on stderr for batch verbs (eval, replay, curate, correct).

On a terminal: a rich bar (done/total, rate, running score, counters, ETA).
Elsewhere (CI logs, pipes, tests): a plain line at most every few seconds
plus a final one, because a live bar written to a file is either silent or
garbage.

The bar counts items (`complete`): trajectories for eval, problems for
curate. The rate and the score count scored samples (`score`): for eval the
same trajectories, for curate each trajectory as it is graded, so a curation
shows problems done/total next to trajectories/s. Counters (kept, exec
errors) are shown as they are given.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

PLAIN_EVERY_S = 5.0


class BatchProgress:
    def __init__(
        self, console: Console, label: str, total: int, *, done: int = 0, hits: int = 0, score_label: str = "acc",
        scored: int | None = None, rate_unit: str = "/s", counters: Sequence[str] = (),
    ) -> None:
        self.console = console
        self.label = label
        self.total = total
        self.score_label = score_label
        self.rate_unit = rate_unit
        self.done = done  # a resumed run starts part-way
        self.scored = done if scored is None else scored
        self.hits = hits
        self.counts = dict.fromkeys(counters, 0)
        self._start_done = self.done  # rate and ETA count this session's work only
        self._start_scored = self.scored
        self._t0 = time.monotonic()
        self._last_plain = 0.0
        self._bar: Progress | None = None
        self._task = TaskID(0)

    def __enter__(self) -> BatchProgress:
        if self.console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TextColumn("{task.fields[score]}"),
                TextColumn("{task.fields[counts]}"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.done, rate=self._rate(),
                                            score=self._score(), counts=self._counts())
        return self

    def advance(self, hit: bool) -> None:
        """One item done, and scored (eval, replay: an item is one sample). One refresh after
        both moved, so a plain line never shows a score without its count."""
        self._count(hit)
        self.done += 1
        self._refresh()

    def score(self, hit: bool, **counts: int) -> None:
        """One sample scored; `counts` are added to the named counters."""
        self._count(hit, **counts)
        self._refresh()

    def add(self, **counts: int) -> None:
        self._count(None, **counts)
        self._refresh()

    def complete(self, n: int = 1) -> None:
        self.done += n
        self._refresh()

    def _count(self, hit: bool | None, **counts: int) -> None:
        if hit is not None:
            self.scored += 1
            self.hits += hit
        for name, n in counts.items():
            self.counts[name] = self.counts.get(name, 0) + n

    def _refresh(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self._rate(), score=self._score(),
                             counts=self._counts())
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._plain()

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        return f"{(self.scored - self._start_scored) / elapsed:.2f}{self.rate_unit}"

    def _score(self) -> str:
        return f"{self.score_label} {100 * self.hits / self.scored:.1f}%" if self.scored else ""

    def _counts(self) -> str:
        return " ".join(f"{name} {n}" for name, n in self.counts.items())

    def _eta(self) -> str:
        fresh = self.done - self._start_done
        if not fresh:
            return "?"
        left = max(0, self.total - self.done) * (time.monotonic() - self._t0) / fresh
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def line(self) -> str:
        parts = [f"{self.label} {self.done}/{self.total}", self._rate(), self._score(), self._counts(), f"ETA {self._eta()}"]
        return " ".join(p for p in parts if p)

    def _plain(self) -> None:
        self._last_plain = time.monotonic()
        self.console.print(self.line(), markup=False, highlight=False)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            self._plain()
