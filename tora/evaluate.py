"""Batch evaluation: every (problem, sample) pair through the loop, then graded.

`BatchRunner.run` is an async generator of graded trajectories in the order
they finish. It does no I/O of its own: writing records, progress bars and
tables belong to whoever iterates it (`tora eval` today, `tora curate` later),
the same split as between `Episode` and its subscribers.

Concurrency is bounded by a semaphore around each episode (model call plus
kernel), so at most `concurrency` kernels are alive at once. Grading runs on
one dedicated thread: it may block on the grading worker pool, and the default
executor's threads are needed by the model backends to stream tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tora.concurrency import bounded_as_completed
from tora.engine import Episode
from tora.events import Finished
from tora.grading import DEFAULT_TIMEOUT, grade_trajectories, grade_trajectory, with_grade
from tora.grading.items import trajectory_prediction
from tora.record import Problem, Trajectory, read_trajectories

Pair = tuple[str, int]  # (problem id, sample index): the unit of work and of resume
EpisodeFactory = Callable[[Problem, int], Episode]


@dataclass(frozen=True)
class Graded:
    """A finished trajectory with its verdict copied into `result`.

    `pred` is the answer the grader read, which is not always the engine's
    `final_answer`: `tora-compat` reads a completion the way ToRA does.
    """

    trajectory: Trajectory
    pred: str | None
    extracted_by: str | None

    @property
    def pair(self) -> Pair:
        return (self.trajectory.problem.id, self.trajectory.sample_index)

    @property
    def correct(self) -> bool:
        return self.trajectory.result.correct is True


def work_list(problems: Sequence[Problem], samples: int, done: Iterable[Pair] = ()) -> list[tuple[Problem, int]]:
    """Every (problem, sample) pair not already done, problem-major so early results span few problems."""
    skip = set(done)
    return [(p, k) for p in problems for k in range(samples) if (p.id, k) not in skip]


# --- resume ------------------------------------------------------------------


def load_finished(path: Path) -> dict[Pair, Trajectory]:
    """Valid records of an earlier run, last one per pair wins.

    A torn last line (kill -9 mid-write) is skipped, not deleted: the writer
    starts the next record on a fresh line. Interrupted trajectories do not
    count as done, so a resumed run redoes them.
    """
    if not path.is_file():
        return {}
    found: dict[Pair, Trajectory] = {}
    for t in read_trajectories(path, skip_invalid=True):
        if t.result.finish != "interrupted":
            found[(t.problem.id, t.sample_index)] = t
    return found


def regrade(trajectories: Sequence[Trajectory], grader: str, timeout: float = DEFAULT_TIMEOUT) -> list[Graded]:
    """Graded views of recorded trajectories; a recorded verdict by the same grader is kept as is."""
    out: list[Graded | None] = []
    todo: list[int] = []
    for t in trajectories:
        if t.result.grader == grader and t.result.grade_status is not None:
            p = trajectory_prediction(t, grader)  # cheap: extraction only, no comparison
            out.append(Graded(t, p.answer, p.extracted_by))
        else:
            todo.append(len(out))
            out.append(None)
    if todo:
        items = grade_trajectories([trajectories[i] for i in todo], grader, timeout)
        for i, item in zip(todo, items, strict=True):
            out[i] = Graded(with_grade(trajectories[i], item), item.pred, item.extracted_by)
    return [g for g in out if g is not None]


# --- the runner --------------------------------------------------------------


async def drive(episode: Episode) -> Trajectory:
    async for event in episode.run():
        if isinstance(event, Finished):
            return event.trajectory
    raise RuntimeError("the episode ended without a Finished event")  # engine contract broken


class BatchRunner:
    def __init__(
        self,
        make_episode: EpisodeFactory,
        *,
        grader: str,
        concurrency: int = 4,
        grade_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.make_episode = make_episode
        self.grader = grader
        self.concurrency = max(1, concurrency)
        self.grade_timeout = grade_timeout

    async def run(self, work: Sequence[tuple[Problem, int]]) -> AsyncGenerator[Graded, None]:
        """Yield each pair's graded trajectory as soon as it is done.

        Closing the generator (or cancelling its consumer) cancels every
        episode still running; those trajectories are not yielded.
        """
        loop = asyncio.get_running_loop()
        grading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tora-grade")

        async def one(pair: tuple[Problem, int]) -> Graded:
            trajectory = await drive(self.make_episode(*pair))
            item = await loop.run_in_executor(grading, grade_trajectory, trajectory, self.grader, self.grade_timeout)
            return Graded(with_grade(trajectory, item), item.pred, item.extracted_by)

        try:
            async with contextlib.aclosing(bounded_as_completed(work, one, self.concurrency)) as results:
                async for graded in results:
                    yield graded
        finally:
            grading.shutdown(wait=False, cancel_futures=True)
