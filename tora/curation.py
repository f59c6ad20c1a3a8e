"""Which trajectories become training data, decided so that a killed run can resume.

A curation run groups its trajectories (`tora curate`: by problem; `tora
correct`: by the wrong trajectory being corrected). Each record is kept or
not by a `KeepRule`; duplicates (same `content_hash`) are dropped; a group
keeps at most `cap`, chosen by a seeded rank.

The kept set of a group is appended to the kept file once the group is
final (every unit of its work is done, or it is full). That append is
idempotent: `Ledger.settle` returns the best-ranked candidates that are not
yet in the kept file, up to the room left under the cap. So a resume that
finds a group final settles it again, and whatever a kill cut short (none,
part or all of the group's lines) is completed without a duplicate. The rank
is a hash of the seed and the unit of work, not of the records' order, so
the choice does not depend on which trajectory finished first, and a group
that grows later (a retried infrastructure failure that now succeeds) only
ever adds to what it kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from tora.record.schema import ExecutionStep, Trajectory
from tora.record.writer import TrajectoryWriter

# Failures of the machinery, not of the model: `--retry-errors` runs them again.
# A unit of work: (group, n): (problem id, sample index) or (parent id, prefix lines).
Unit = tuple[str, int]

INFRA_ERRORS = frozenset({"backend", "kernel", "sandbox", "internal"})


def infra_failure(t: Trajectory) -> bool:
    return t.result.finish == "error" and t.result.error is not None and t.result.error.kind in INFRA_ERRORS


def tool_errors(t: Trajectory, since_step: int = 0) -> int:
    """Cells that did not run cleanly (error, timeout, kernel death), from step `since_step` on."""
    return sum(isinstance(s, ExecutionStep) and s.status != "ok" for s in t.steps[since_step:])


@dataclass(frozen=True)
class KeepRule:
    """A kept trajectory answered, was graded correct and (unless allowed) ran every cell cleanly.

    `since_step` judges only the steps from there on: a teacher's correction
    is kept for what the teacher wrote, even when the prefix it continues
    holds the failed cell that it repairs.
    """

    keep_tool_errors: bool = False

    def keeps(self, t: Trajectory, since_step: int = 0) -> bool:
        if t.result.correct is not True or t.result.finish != "answered":
            return False
        return self.keep_tool_errors or tool_errors(t, since_step) == 0


def content_hash(t: Trajectory) -> str:
    return t.content_hash or t.compute_content_hash()


def rank(seed: int, t: Trajectory) -> str:
    """A seeded order over a group's candidates that depends on the unit of work alone."""
    unit = f"{seed}\0{t.problem.id}\0{t.sample_index}\0{t.parent or ''}\0{t.prefix_lines or 0}"
    return hashlib.sha256(unit.encode()).hexdigest()


@dataclass
class Ledger:
    """A curation run's state: the latest record of each unit of work, and what each group kept.

    `key` names a unit of work (a later record of it supersedes an earlier
    one), `group` the set it is curated in. `eligible(t)` says whether a
    record may be kept at all.
    """

    key: Callable[[Trajectory], Unit]
    group: Callable[[Trajectory], str]
    eligible: Callable[[Trajectory], bool]
    cap: int | None = None
    seed: int = 0
    records: dict[str, dict[Unit, Trajectory]] = field(default_factory=dict)
    kept: dict[str, list[Trajectory]] = field(default_factory=dict)
    hashes: set[str] = field(default_factory=set)

    def add_record(self, t: Trajectory) -> None:
        self.records.setdefault(self.group(t), {})[self.key(t)] = t

    def add_kept(self, t: Trajectory) -> None:
        """A record already in the kept file (read on resume, or just appended)."""
        kept = self.kept.setdefault(self.group(t), [])
        if all(k.id != t.id for k in kept):
            kept.append(t)
        self.hashes.add(content_hash(t))

    def done(self, group: str) -> dict[Unit, Trajectory]:
        return self.records.get(group, {})

    def candidates(self, group: str) -> list[Trajectory]:
        """The group's keepable records, best rank first."""
        keep = [t for t in self.done(group).values() if self.eligible(t)]
        return sorted(keep, key=lambda t: rank(self.seed, t))

    def prospective(self, group: str) -> int:
        """How many the group would keep if it were settled now."""
        return len(self.kept.get(group, [])) + len(self._fill(group, dict.fromkeys(self.hashes)))

    def full(self, group: str) -> bool:
        return self.cap is not None and self.prospective(group) >= self.cap

    def _fill(self, group: str, seen: dict[str, None]) -> list[Trajectory]:
        kept = self.kept.get(group, [])
        room = None if self.cap is None else self.cap - len(kept)
        ids = {t.id for t in kept}
        out: list[Trajectory] = []
        for t in self.candidates(group):
            if room is not None and len(out) >= room:
                break
            digest = content_hash(t)
            if t.id in ids or digest in seen:
                continue
            seen[digest] = None
            out.append(t)
        return out

    def settle(self, group: str) -> list[Trajectory]:
        """What to append for a final group; the caller appends them, then calls `add_kept` for each."""
        return self._fill(group, dict.fromkeys(self.hashes))

    def duplicate_candidates(self) -> int:
        """Keepable records that were not kept because an identical one was."""
        kept_ids = {t.id for kept in self.kept.values() for t in kept}
        return sum(1 for recs in self.records.values() for t in recs.values()
                   if self.eligible(t) and t.id not in kept_ids and content_hash(t) in self.hashes)

    def kept_count(self) -> int:
        return sum(len(k) for k in self.kept.values())

    def load(self, records: Iterable[Trajectory], kept: Iterable[Trajectory],
             seen: Iterable[Trajectory] = ()) -> None:
        """An earlier session's records and kept ones; `seen`: other kept records (of another
        verb, in the same kept file) that count for duplicates but belong to no group here."""
        for t in records:
            self.add_record(t)
        for t in kept:
            self.add_kept(t)
        self.hashes.update(content_hash(t) for t in seen)


class Work:
    """The units of work of a curation run, grouped, and what is final.

    A unit is a `(group, ...)` tuple: `(problem id, sample index)` for
    curate, `(parent id, prefix lines)` for correct. A unit is done when it
    has a record, unless that record is an infrastructure failure and
    `retry_errors` asks for it again (once per session: `attempted`). A
    group is final when every unit is done, when it has kept `cap`, or, with
    `stop_when_full`, when it would keep `cap` if settled now.
    """

    def __init__(self, ledger: Ledger, units: dict[str, list[Unit]], *, retry_errors: bool = False,
                 stop_when_full: bool = False) -> None:
        self.ledger = ledger
        self.units = units
        self.retry_errors = retry_errors
        self.stop_when_full = stop_when_full
        self.closed: set[str] = set()
        self.attempted: set[Unit] = set()
        self.new: list[Trajectory] = []

    def latest(self) -> list[Trajectory]:
        return [t for group in self.units for t in self.ledger.done(group).values()]

    def to_retry(self) -> set[Unit]:
        if not self.retry_errors:
            return set()
        return {unit for units in self.units.values() for unit in units
                if (t := self.ledger.done(unit[0]).get(unit)) is not None and infra_failure(t)}

    def done(self, unit: Unit) -> bool:
        t = self.ledger.done(unit[0]).get(unit)
        if t is None:
            return False
        return unit in self.attempted or not (self.retry_errors and infra_failure(t))

    def final(self, group: str) -> bool:
        cap = self.ledger.cap
        if cap is not None and len(self.ledger.kept.get(group, [])) >= cap:
            return True
        if self.stop_when_full and self.ledger.full(group):
            return True
        return all(self.done(unit) for unit in self.units[group])

    def not_run(self) -> int:
        """Units of final groups that never ran: what a full group saved."""
        return sum(1 for group in self.closed for unit in self.units[group] if unit not in self.ledger.done(group))

    def open(self, group: str) -> bool:
        """Whether the group still wants work (the scheduler's `wanted` check, by group)."""
        return group not in self.closed

    def pending(self, group: str) -> Iterator[Unit]:
        """The group's units still to run, drawn lazily: none once the group is final."""
        for unit in self.units[group]:
            if group in self.closed:
                return
            if not self.done(unit):
                yield unit

    async def close(self, group: str, kept_file: TrajectoryWriter) -> int:
        """Append the final group's kept set (one write); returns how many were appended."""
        kept = self.ledger.settle(group)
        await kept_file.append_all(kept)
        self._book(group, kept)
        return len(kept)

    def _book(self, group: str, kept: list[Trajectory]) -> None:
        for t in kept:
            self.ledger.add_kept(t)
        self.closed.add(group)

    def settle_closed(self, group: str) -> list[Trajectory]:
        """Close a final group and return its kept set, for a caller that appends it itself
        (a cluster worker, to its shard: `tora.distributed.plan.CuratePlan`)."""
        kept = self.ledger.settle(group)
        self._book(group, kept)
        return kept

    def _add(self, t: Trajectory, unit: Unit) -> bool:
        """Book a finished trajectory; True if that made its (open) group final."""
        self.new.append(t)
        self.attempted.add(unit)
        self.ledger.add_record(t)
        return unit[0] not in self.closed and self.final(unit[0])

    def note(self, t: Trajectory, unit: Unit) -> list[Trajectory] | None:
        """A finished trajectory its caller has appended: booked; the group's kept set if that closed it."""
        return self.settle_closed(unit[0]) if self._add(t, unit) else None

    async def close_finished(self, kept_file: TrajectoryWriter) -> None:
        """At the start of a session: groups an earlier one finished, whose kept set a kill may have cut short."""
        for group in self.units:
            if self.final(group):
                await self.close(group, kept_file)

    async def record(self, t: Trajectory, unit: Unit, records: TrajectoryWriter,
                     kept_file: TrajectoryWriter) -> int | None:
        """A finished trajectory: appended to the records first, then, if that made its group
        final, the group is settled. Returns how many were kept if the group closed."""
        await records.append(t)
        return await self.close(unit[0], kept_file) if self._add(t, unit) else None
