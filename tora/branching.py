"""Samples of one problem that branch from one generated prefix (`tora curate --branch-after-cell N`).

The problem's first pending sample (the *leader*) is generated as usual; right
after its N-th cell has run, its steps so far become the prefix the other
samples (its *followers*) share verbatim, and its kernel is forked once into
the prefix's stem (`tora.prefix_kernels`), which each follower forks in turn.
The leader goes on in its own kernel; each follower continues from the prefix
with its own seed, in a copy of the very state whose outputs the prefix shows.
A leader that ends before its N-th cell (it answered, failed, was withdrawn)
shares nothing: its followers run as whole samples of their own.

A follower's job waits for the leader's prefix before it takes a slot
(`Job.resolve`), so waiting followers hold no slot and no kernel.

Resume: a record that says it shares a prefix (`shared_prefix`) holds it
verbatim, so the problem's samples still to run continue from that record's
first steps, their kernel rebuilt by re-running the prefix's cells once
(forked for each; `kernel_state` names the cells that came out otherwise than
recorded). A problem with records none of which shares a prefix runs its
remaining samples whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tora.engine import Episode, Prefix
from tora.prefix_kernels import PrefixKernels, forked_state, recorded_cells
from tora.record.schema import CodeStep, KernelState, SharedPrefix, Step, Trajectory

if TYPE_CHECKING:
    from tora.scheduler import Job


def shared_prefix_of(t: Trajectory) -> Prefix:
    """The prefix a record shares with its problem's other samples (its first `shared_prefix.steps`)."""
    assert t.shared_prefix is not None
    steps = tuple(s.model_copy(deep=True) for s in t.steps[: t.shared_prefix.steps])
    return _prefix(t.id, t.prompt, t.prompt_ids, steps, t.shared_prefix.sample_index)


def _prefix(key: str, prompt: str, prompt_ids: list[int] | None, steps: tuple[Step, ...],
            sample_index: int) -> Prefix:
    lines = "".join(s.context_text() for s in steps).count("\n")
    return Prefix(parent=key, lines=lines, prompt=prompt, steps=steps, shared_from=sample_index,
                  prompt_ids=None if prompt_ids is None else tuple(prompt_ids))


@dataclasses.dataclass
class _Branch:
    leader: int  # the sample that generates the prefix
    followers: int
    prefix: asyncio.Future[Prefix | None]


class Branches:
    """One curate run's branch points, by problem; the engine's `Brancher` for its episodes."""

    def __init__(self, after_cell: int, stems: PrefixKernels) -> None:
        self.after_cell = after_cell
        self.stems = stems
        self._branches: dict[str, _Branch] = {}

    def plan(self, problem_id: str, pending: list[int], recorded: Iterable[Trajectory],
             timeout_s: float) -> dict[int, Prefix | None]:
        """How each pending sample of a problem starts: from a recorded shared prefix (a Prefix),
        live from the leader's (None for the leader, the followers then `follow`), or whole (absent)."""
        recorded = list(recorded)
        shared = next((t for t in recorded if t.shared_prefix is not None), None)
        if shared is not None:
            prefix = shared_prefix_of(shared)
            self.stems.expect(prefix.parent, prefix.steps, timeout_s, [len(prefix.cells)] * len(pending))
            return dict.fromkeys(pending, prefix)
        if recorded or len(pending) < 2:
            return {}  # samples already ran whole (the leader shared nothing): the rest do too
        loop = asyncio.get_running_loop()
        self._branches[problem_id] = _Branch(pending[0], len(pending) - 1, loop.create_future())
        return dict.fromkeys(pending, None)

    def is_leader(self, problem_id: str, sample_index: int) -> bool:
        branch = self._branches.get(problem_id)
        return branch is not None and branch.leader == sample_index

    async def follow(self, job: Job) -> Job:
        """The follower's job once its leader has branched (or ended without doing so)."""
        prefix = await asyncio.shield(self._branches[job.problem.id].prefix)
        return dataclasses.replace(job, prefix=prefix, resolve=None)

    def withdrawn(self, job: Job) -> None:
        """A job dropped unrun: a leader's followers then wait for no prefix."""
        if self.is_leader(job.problem.id, job.sample_index):
            self._resolve(job.problem.id, None)

    def _resolve(self, problem_id: str, prefix: Prefix | None) -> None:
        branch = self._branches[problem_id]
        if not branch.prefix.done():
            branch.prefix.set_result(prefix)

    # -- the engine's Brancher ----------------------------------------------------------------

    async def branch(self, episode: Episode, kernel: Any) -> SharedPrefix | None:
        branch = self._branches.get(episode.problem.id)
        calls = sum(isinstance(s, CodeStep) for s in episode.steps)
        if (branch is None or branch.leader != episode.sample_index or branch.prefix.done()
                or episode.prefix is not None or calls != self.after_cell):
            return None
        steps = tuple(s.model_copy(deep=True) for s in episode.steps)
        prefix = _prefix(episode.id, episode.prompt, episode.prompt_ids if episode.tokens else None, steps,
                         episode.sample_index)
        cells = recorded_cells(steps, episode.config.limits.timeout_s)
        # One fork now, the stem the followers fork in turn: the leader waits only for this one.
        try:
            stem, forked = await self.stems.pool.fork(kernel, cells)
        except Exception:
            self._resolve(episode.problem.id, None)  # no copy: the followers run whole, the leader goes on
            return None
        self.stems.expect(prefix.parent, steps, episode.config.limits.timeout_s, [len(cells)] * branch.followers)
        self.stems.seed(prefix.parent, stem, len(cells), forked_state(KernelState(method="fork"), forked, len(cells)))
        self._resolve(episode.problem.id, prefix)
        return SharedPrefix(sample_index=episode.sample_index, steps=len(steps))

    async def ended(self, episode: Episode) -> None:
        if self.is_leader(episode.problem.id, episode.sample_index) and episode.prefix is None:
            self._resolve(episode.problem.id, None)
