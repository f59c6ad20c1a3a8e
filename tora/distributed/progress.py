"""The driver's view of a cluster run on stderr: one row per node, polled from the workers.

On a terminal: a live table (tokens/s, trajectories/s, trajectories in
flight, jobs waiting for a slot, grading queue, kernels in use, problems
leased). Elsewhere (CI logs, pipes): one plain line every few seconds and
the table at the end, as `tora.progress` does for one process.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from rich.console import Console
from rich.live import Live
from rich.table import Table

from tora.distributed.worker import WorkerStats
from tora.progress import PLAIN_EVERY_S

WINDOW_S = 10.0  # rates are measured over the last this many seconds


@dataclass
class NodeRow:
    node: str
    workers: int = 0
    tokens_s: float = 0.0
    trajectories_s: float = 0.0
    in_flight: int = 0
    waiting: int = 0
    grading: int = 0
    kernels_live: int = 0
    kernels_limit: int = 0
    problems: int = 0
    trajectories: int = 0
    errors: int = 0


class ClusterProgress:
    def __init__(self, console: Console, label: str, total_problems: int, *, done: int = 0) -> None:
        self.console = console
        self.label = label
        self.total = total_problems
        self.done = done  # problems complete (a resumed run starts part-way)
        self.lost = 0
        self._history: dict[str, deque[WorkerStats]] = {}
        self._latest: dict[str, WorkerStats] = {}
        self._live: Live | None = None
        self._last_plain = 0.0

    def __enter__(self) -> ClusterProgress:
        if self.console.is_terminal:
            self._live = Live(self.table(), console=self.console, refresh_per_second=2, transient=False)
            self._live.start()
        return self

    def update(self, stats: Sequence[WorkerStats], *, done: int, lost: int) -> None:
        self.done, self.lost = done, lost
        for s in stats:
            history = self._history.setdefault(s.name, deque())
            history.append(s)
            while len(history) > 2 and s.at - history[0].at > WINDOW_S:
                history.popleft()
            self._latest[s.name] = s
        if self._live is not None:
            self._live.update(self.table())
        elif time.monotonic() - self._last_plain >= PLAIN_EVERY_S:
            self._plain()

    def forget(self, worker: str) -> None:
        """A lost worker: its row goes; what it recorded stays in the totals of the run."""
        self._latest.pop(worker, None)
        self._history.pop(worker, None)

    def _rate(self, name: str) -> tuple[float, float]:
        history = self._history.get(name)
        if not history or len(history) < 2:
            return 0.0, 0.0
        first, last = history[0], history[-1]
        dt = last.at - first.at
        if dt <= 0:
            return 0.0, 0.0
        return (last.tokens - first.tokens) / dt, (last.trajectories - first.trajectories) / dt

    def rows(self) -> list[NodeRow]:
        by_node: dict[str, NodeRow] = {}
        latest = sorted(self._latest.values(), key=lambda s: (s.host, s.node, s.name))
        # Several nodes on one host (a simulated cluster) are told apart by node id.
        shared_host = len({s.host for s in latest}) < len({s.node for s in latest})
        for s in latest:
            row = by_node.setdefault(s.node, NodeRow(f"{s.host}:{s.node[:6]}" if shared_host else s.host))
            tokens_s, traj_s = self._rate(s.name)
            row.workers += 1
            row.tokens_s += tokens_s
            row.trajectories_s += traj_s
            row.in_flight += s.in_flight
            row.waiting += s.waiting
            row.grading += s.grading
            row.kernels_live += s.kernels_live
            row.kernels_limit += s.kernels_limit
            row.problems += s.problems
            row.trajectories += s.trajectories
            row.errors += s.errors
        return list(by_node.values())

    def _sum(self, rows: Sequence[NodeRow]) -> NodeRow:
        t = NodeRow("total")
        for r in rows:
            for name in ("workers", "tokens_s", "trajectories_s", "in_flight", "waiting", "grading", "kernels_live",
                         "kernels_limit", "problems", "trajectories", "errors"):
                setattr(t, name, getattr(t, name) + getattr(r, name))
        return t

    def table(self) -> Table:
        rows = self.rows()
        correct = sum(s.correct for s in self._latest.values())
        made = sum(s.trajectories for s in self._latest.values())
        acc = f" · acc {100 * correct / made:.1f}%" if made else ""
        lost = f" · {self.lost} workers lost" if self.lost else ""
        table = Table(title=f"{self.label}: {self.done}/{self.total} problems{acc}{lost}", title_justify="left")
        for name in ("node", "workers", "tok/s", "traj/s", "in flight", "waiting", "grading", "kernels", "problems",
                     "done", "errors"):
            table.add_column(name, justify="left" if name == "node" else "right")
        for r in [*rows, self._sum(rows)] if len(rows) > 1 else rows:
            table.add_row(r.node, str(r.workers), f"{r.tokens_s:.0f}", f"{r.trajectories_s:.2f}", str(r.in_flight),
                          str(r.waiting), str(r.grading), f"{r.kernels_live}/{r.kernels_limit}", str(r.problems),
                          str(r.trajectories), str(r.errors), style="bold" if r.node == "total" else None)
        return table

    def line(self) -> str:
        t = self._sum(self.rows())
        return (f"{self.label} {self.done}/{self.total} problems, {t.trajectories} trajectories, "
                f"{t.trajectories_s:.2f} traj/s, {t.tokens_s:.0f} tok/s, {t.workers} workers, "
                f"kernels {t.kernels_live}/{t.kernels_limit}, in flight {t.in_flight}, waiting {t.waiting}"
                + (f", {self.lost} workers lost" if self.lost else ""))

    def _plain(self) -> None:
        self._last_plain = time.monotonic()
        self.console.print(self.line(), markup=False, highlight=False)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.update(self.table())
            self._live.stop()
        else:
            self._plain()
