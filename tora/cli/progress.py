"""Progress on stderr for batch verbs (eval, replay).

On a terminal: a rich bar (done/total, rate, running score, ETA). Elsewhere
(CI logs, pipes, tests): a plain line at most every few seconds plus a final
one, because a live bar written to a file is either silent or garbage.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

PLAIN_EVERY_S = 5.0


class BatchProgress:
    def __init__(
        self, console: Console, label: str, total: int, *, done: int = 0, hits: int = 0, score_label: str = "acc"
    ) -> None:
        self.console = console
        self.label = label
        self.total = total
        self.score_label = score_label
        self.done = done  # a resumed run starts part-way
        self.hits = hits
        self._start_done = done  # rate and ETA count this session's work only
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
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(
                self.label, total=self.total, completed=self.done, rate="", score=self._score()
            )
        return self

    def advance(self, hit: bool) -> None:
        self.done += 1
        self.hits += hit
        if self._bar is not None:
            self._bar.update(self._task, advance=1, rate=self._rate(), score=self._score())
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._plain()

    def _rate(self) -> str:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        return f"{(self.done - self._start_done) / elapsed:.2f}/s"

    def _score(self) -> str:
        return f"{self.score_label} {100 * self.hits / self.done:.1f}%" if self.done else ""

    def _eta(self) -> str:
        fresh = self.done - self._start_done
        if not fresh:
            return "?"
        left = (self.total - self.done) * (time.monotonic() - self._t0) / fresh
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def line(self) -> str:
        return f"{self.label} {self.done}/{self.total} {self._rate()} {self._score()} ETA {self._eta()}".replace("  ", " ")

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
