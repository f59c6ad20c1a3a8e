"""The driver of a run spread over Ray workers: leases problems, survives lost workers, merges shards.

`run_on_cluster` is what a batch verb calls with `--engine ray`: the run
folder, the problems, the verb's `ProblemPlan` (inside the `WorkerSetup`
every worker builds its parts from) and the cluster's sizing. It

1. merges what earlier sessions left in the shards, and asks the plan which
   problems still have work (`pending`), judged from valid records only;
2. starts the workers (Ray actors, spread over the nodes, each asking for
   `worker_cpus` CPUs and `worker_gpus` GPUs);
3. leases problems in small batches, a few leases ahead per worker, each
   with the records earlier sessions or lost workers left for its problems,
   and logs each lease in leases.jsonl;
4. when a worker dies or fails, kills it (so it can write nothing more),
   merges its shard, and leases its unfinished problems again, once, with
   the records it left: only the units of work that have no record run
   again. A replacement worker is started while the budget allows;
5. merges the shards into trajectories.jsonl (and curated.jsonl) as leases
   end, and once more at the end or when interrupted.

Workers are named `s<session>-w<i>` (the session counts the drivers that
ran this folder, from the lease log), and so are their shards: a shard has
one writer for ever, even if a dead session's worker is still being reaped.
The Ray actor's name adds a digest of the run folder, so a second driver on
the same run folder and cluster fails at the start instead of writing
beside the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tora.distributed.cluster import NAMESPACE, connected
from tora.distributed.leases import LeaseEvent, LeaseLog, last_session, open_leases, read_leases
from tora.distributed.plan import Prior
from tora.distributed.progress import ClusterProgress
from tora.distributed.shards import MergeCounts, ShardMerge
from tora.distributed.worker import LeaseReport, ShardWorker, WorkerInfo, WorkerSetup
from tora.errors import ToraError, UsageError
from tora.record import Problem, Trajectory
from tora.run_dir import SHARDS


@dataclass(frozen=True)
class ClusterOptions:
    """How a run is spread: how many workers, what each asks of Ray, how work is handed out."""

    address: str | None = None  # None: a private cluster on this machine, on loopback
    workers: int | None = None  # None: one per alive node
    worker_cpus: float = 1.0  # Ray's num_cpus per worker: what it reserves for its kernels and loop
    worker_gpus: float = 0.0  # for a model loaded in the worker (vLLM, llama.cpp on a GPU)
    problems_per_lease: int | None = None  # None: about one lease fills a worker's in-flight slots
    leases_ahead: int = 2  # leases a worker holds at once, so it never waits for the next one
    replacements: int | None = None  # workers started to replace lost ones, in all [default: --actors]
    poll_s: float = 1.0  # progress polls and merges
    start_timeout_s: float = 600.0  # for the workers to start (model load, first kernel)

    def describe(self, run: ClusterRun) -> dict[str, Any]:
        """The manifest's `engine` entry of a session."""
        return {"name": "ray", "address": self.address, "session": run.session,
                "workers": [{"name": w.name, "node": w.node, "host": w.host} for w in sorted(run.workers, key=lambda w: w.name)],
                "worker_cpus": self.worker_cpus, "worker_gpus": self.worker_gpus}


@dataclass
class ClusterRun:
    """What one driver session did."""

    session: int
    workers: list[WorkerInfo] = field(default_factory=list)
    leases: int = 0
    lost: list[str] = field(default_factory=list)  # "worker: reason"
    problems_done: int = 0
    skipped: int = 0  # problems complete before this session
    reopened: int = 0  # leases the previous session left open
    merged: MergeCounts = field(default_factory=MergeCounts)

    def backend(self, previous: dict[str, Any] | None) -> dict[str, str]:
        """The manifest's `backend`: as the workers loaded it (the driver loads no model), else as before."""
        if self.workers:
            return {"name": self.workers[0].backend, "model": self.workers[0].model}
        found = (previous or {}).get("backend")
        return found if isinstance(found, dict) else {"name": "?", "model": "?"}


@dataclass
class _Lease:
    id: str
    problems: list[Problem]


@dataclass
class _Slot:
    name: str
    base: str  # the worker it is or replaces: w<i>
    handle: Any
    info: WorkerInfo | None = None
    alive: bool = True
    leases: dict[str, _Lease] = field(default_factory=dict)


class _PriorBook:
    """The records of the problems that may still be leased (the rest are dropped as they finish)."""

    def __init__(self, ids: set[str]) -> None:
        self.by_id: dict[str, Prior] = {pid: Prior() for pid in ids}

    def observe(self, t: Trajectory, kept: bool) -> None:
        entry = self.by_id.get(t.problem.id)
        if entry is not None:
            (entry.kept if kept else entry.records).append(t)

    def get(self, pid: str) -> Prior:
        return self.by_id.get(pid) or Prior()

    def drop(self, pid: str) -> None:
        self.by_id.pop(pid, None)


_NAME_RETRIES = 30


def actor_prefix(run_dir: Path) -> str:
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"tora-{digest}"


async def _wait(ref: Any) -> Any:
    return await asyncio.wrap_future(ref.future())


class Driver:
    def __init__(self, ray: Any, run_dir: Path, problems: Sequence[Problem], setup: WorkerSetup,
                 options: ClusterOptions, progress: ClusterProgress | None) -> None:
        self.ray = ray
        self.run_dir = Path(run_dir)
        self.problems = list(problems)
        self.setup = setup
        self.options = options
        self.progress = progress
        events = list(read_leases(self.run_dir))
        self.run = ClusterRun(session=last_session(events) + 1, reopened=len(open_leases(events)))
        self.prior = _PriorBook({p.id for p in self.problems})
        self.merge = ShardMerge(self.run_dir, observe=self.prior.observe)
        self.log = LeaseLog(self.run_dir)
        self.todo: deque[Problem] = deque()
        self.slots: dict[str, _Slot] = {}
        self.pending: dict[asyncio.Future[Any], tuple[_Slot, _Lease]] = {}
        self._leases = 0
        self._replacements = options.replacements
        self._generation: dict[str, int] = {}
        self._remote = ray.remote(ShardWorker)
        self._prefix = actor_prefix(self.run_dir)
        self._claim: Any = None

    # --- the run folder ----------------------------------------------------

    async def claim(self) -> None:
        """Hold the run folder on this cluster, and fence the workers a dead driver of it left.

        The claim is a named actor: Ray refuses a second one while the first
        lives, and reaps it with its driver. Once it is ours, any worker of
        this folder still alive belongs to a driver that died (being reaped,
        or cut off): it is killed before its shard is read, so that it cannot
        record a unit of work that this session runs again.
        """
        claim = self.ray.remote(num_cpus=0)(_Claim).options(name=f"{self._prefix}-driver", namespace=NAMESPACE)
        for _ in range(_NAME_RETRIES):
            try:
                self._claim = claim.remote()
                break
            except ValueError:
                await asyncio.sleep(1.0)  # a driver that just died is reaped in a few seconds
        else:
            raise UsageError(f"{self.run_dir}: another driver is running this run on this cluster; "
                             "wait for it or stop it")
        from ray.util import list_named_actors

        for entry in list_named_actors(all_namespaces=True):
            name, namespace = entry["name"], entry["namespace"]
            if namespace == NAMESPACE and name.startswith(f"{self._prefix}-s"):
                with contextlib.suppress(ValueError):
                    stale = self.ray.get_actor(name, namespace=NAMESPACE)
                    self.ray.kill(stale, no_restart=True)
                    await self._dead(stale)

    # --- work ---------------------------------------------------------------

    def plan_work(self) -> None:
        self.merge.load()
        self.run.merged += self.merge.merge()
        plan = self.setup.plan
        for p in self.problems:
            before = self.prior.get(p.id)
            if plan.pending(p, before.records, before.kept):
                self.todo.append(p)
            else:
                self.prior.drop(p.id)
                self.run.skipped += 1

    def batch_size(self, samples_hint: int) -> int:
        if self.options.problems_per_lease:
            return self.options.problems_per_lease
        return max(1, math.ceil(self.setup.capacity.in_flight / max(1, samples_hint)))

    # --- workers ------------------------------------------------------------

    async def _spawn(self, base: str) -> _Slot:
        """A new worker `s<session>-<base>` (a replacement: `...r<n>`); its shard is named after it."""
        n = self._generation.get(base, 0)
        self._generation[base] = n + 1
        name = f"s{self.run.session}-{base}" + (f"r{n}" if n else "")
        o = self.options
        actor = self._remote.options(
            name=f"{self._prefix}-{name}", namespace=NAMESPACE, num_cpus=o.worker_cpus, num_gpus=o.worker_gpus,
            max_restarts=0, max_concurrency=max(8, 2 * o.leases_ahead + 4), scheduling_strategy="SPREAD")
        for _ in range(_NAME_RETRIES):
            try:
                handle = actor.remote(name, str(self.run_dir), self.setup)
                break
            except ValueError:
                # The name is taken: a driver of this run folder is alive on this cluster, or one that
                # just died left its workers to be reaped (a few seconds).
                await asyncio.sleep(1.0)
        else:
            raise UsageError(f"{self.run_dir}: another driver is running this run on this cluster "
                             f"(its worker {name} is alive); wait for it or stop it")
        slot = _Slot(name, base, handle)
        self.slots[name] = slot
        return slot

    async def _start(self, slot: _Slot) -> None:
        try:
            info: WorkerInfo = await asyncio.wait_for(_wait(slot.handle.start.remote()), self.options.start_timeout_s)
        except BaseException:
            slot.alive = False
            with contextlib.suppress(Exception):
                self.ray.kill(slot.handle, no_restart=True)
            raise
        slot.info = info
        self.log.write(LeaseEvent(event="start", lease="", worker=slot.name, session=self.run.session,
                                  node=info.node, host=info.host, pid=info.pid))
        self.run.workers.append(info)

    async def start_workers(self) -> None:
        count = self.options.workers or max(1, sum(1 for n in self.ray.nodes() if n.get("Alive")))
        if self._replacements is None:
            self._replacements = count
        slots = [await self._spawn(f"w{i}") for i in range(count)]
        results = await asyncio.gather(*(self._start(s) for s in slots), return_exceptions=True)
        failures = [(s, r) for s, r in zip(slots, results, strict=True) if isinstance(r, BaseException)]
        for slot, exc in failures:
            slot.alive = False
            self.run.lost.append(f"{slot.name}: did not start: {_reason(exc)}")
        if len(failures) == len(slots):
            slot, exc = failures[0]
            if isinstance(exc, TimeoutError):
                raise ToraError(f"no worker started within {self.options.start_timeout_s:.0f} s: the cluster may "
                                f"lack the resources each asks for (num_cpus={self.options.worker_cpus:g}, "
                                f"num_gpus={self.options.worker_gpus:g}); see `ray status`")
            raise ToraError(f"no worker started; the first: {_reason(exc)}")

    def _alive(self) -> list[_Slot]:
        return [s for s in self.slots.values() if s.alive and s.info is not None]

    async def _lose(self, slot: _Slot, exc: BaseException) -> None:
        """A worker died or failed: fence it, merge what it left, lease its problems again."""
        if not slot.alive:
            return
        slot.alive = False
        reason = _reason(exc)
        self.run.lost.append(f"{slot.name}: {reason}")
        with contextlib.suppress(Exception):
            self.ray.kill(slot.handle, no_restart=True)
        await self._dead(slot.handle)
        for fut in [f for f, (s, _) in self.pending.items() if s is slot]:
            self.pending.pop(fut)
            fut.cancel()
        # What it recorded is in its shard: merged now, so each of its
        # problems is leased again with every record the worker left.
        self.run.merged += self.merge.merge()
        again: list[Problem] = []
        for lease in slot.leases.values():
            self.log.write(LeaseEvent(event="lost", lease=lease.id, worker=slot.name, session=self.run.session,
                                      reason=reason))
            again.extend(lease.problems)
        slot.leases.clear()
        self.todo.extendleft(reversed(again))
        if self.progress is not None:
            self.progress.forget(slot.name)
        if self._replacements:
            self._replacements -= 1
            fresh = await self._spawn(slot.base)
            try:
                await self._start(fresh)
            except Exception as start_exc:
                fresh.alive = False
                self.run.lost.append(f"{fresh.name}: did not start: {_reason(start_exc)}")

    async def _dead(self, handle: Any) -> None:
        """Wait until Ray reports the worker dead: after that it appends nothing to its shard."""
        actor_died = self.ray.exceptions.RayActorError
        for _ in range(60):
            try:
                await asyncio.wait_for(_wait(handle.stats.remote()), 5)
            except actor_died:
                return
            except Exception:
                pass
            await asyncio.sleep(0.5)

    # --- leases -------------------------------------------------------------

    def _lease(self, slot: _Slot, size: int) -> None:
        batch = [self.todo.popleft() for _ in range(min(size, len(self.todo)))]
        self._leases += 1
        lease = _Lease(f"{self.run.session}-{self._leases}", batch)
        self.log.write(LeaseEvent(event="lease", lease=lease.id, worker=slot.name, session=self.run.session,
                                  problems=[p.id for p in batch]))
        prior = {p.id: self.prior.get(p.id) for p in batch}
        fut = asyncio.ensure_future(_wait(slot.handle.run_lease.remote(lease.id, batch, prior)))
        slot.leases[lease.id] = lease
        self.pending[fut] = (slot, lease)
        self.run.leases += 1

    def _ended(self, slot: _Slot, lease: _Lease, report: LeaseReport) -> None:
        slot.leases.pop(lease.id, None)
        self.log.write(LeaseEvent(event="done", lease=lease.id, worker=slot.name, session=self.run.session))
        for p in lease.problems:
            self.prior.drop(p.id)
        self.run.problems_done += len(lease.problems)

    async def drive(self, samples_hint: int) -> None:
        size = self.batch_size(samples_hint)
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while self.todo or self.pending:
            alive = self._alive()
            if not alive:
                raise ToraError("every worker was lost; the last: " + (self.run.lost[-1] if self.run.lost else "?"))
            ahead = self.options.leases_ahead
            for _ in range(ahead):  # round robin: every worker gets its first lease before any gets a second
                for slot in alive:
                    if self.todo and len(slot.leases) < ahead:
                        # Smaller leases towards the end, so that no worker is left with the tail alone.
                        self._lease(slot, max(1, min(size, math.ceil(len(self.todo) / (len(alive) * ahead)))))
            timeout = max(0.0, next_poll - loop.time())
            done, _ = await asyncio.wait(list(self.pending), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                if fut not in self.pending:
                    continue  # its worker was lost while another of its leases was handled
                slot, lease = self.pending.pop(fut)
                exc = fut.exception()
                if exc is None:
                    self._ended(slot, lease, fut.result())
                else:
                    await self._lose(slot, exc)
            if loop.time() >= next_poll:
                next_poll = loop.time() + self.options.poll_s
                self.run.merged += self.merge.merge()
                await self.poll()

    async def poll(self) -> None:
        if self.progress is None:
            return
        alive = self._alive()
        results = await asyncio.gather(*(asyncio.wait_for(_wait(s.handle.stats.remote()), 5) for s in alive),
                                       return_exceptions=True)
        stats = [r for r in results if not isinstance(r, BaseException)]
        self.progress.update(stats, done=self.run.skipped + self.run.problems_done, lost=len(self.run.lost))

    async def stop(self) -> None:
        """Close the workers (their kernels, models and shards) and merge what they wrote."""
        alive = [s for s in self.slots.values() if s.alive]
        for fut in self.pending:
            fut.cancel()
        if self.pending:
            for slot, lease in self.pending.values():
                self.log.write(LeaseEvent(event="lost", lease=lease.id, worker=slot.name, session=self.run.session,
                                          reason="the driver stopped"))
            self.pending.clear()
        await asyncio.gather(*(asyncio.wait_for(_wait(s.handle.close.remote()), 30) for s in alive),
                             return_exceptions=True)
        for slot in alive:
            with contextlib.suppress(Exception):
                self.ray.kill(slot.handle, no_restart=True)
            slot.alive = False
        self.run.merged += self.merge.merge()
        self.merge.close()
        self.log.close()
        if self._claim is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(self._claim, no_restart=True)


class _Claim:
    """Holds a run folder on a cluster for as long as its driver lives (see `Driver.claim`)."""

    def held(self) -> bool:
        return True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in reversed(text) if line.strip()), "") if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


async def run_on_cluster(run_dir: Path, problems: Sequence[Problem], setup: WorkerSetup, options: ClusterOptions,
                         *, samples_hint: int = 1, progress: ClusterProgress | None = None,
                         on_started: Callable[[ClusterRun], None] | None = None) -> ClusterRun:
    """Run every pending problem of `problems` on Ray workers; see the module docstring.

    `on_started` is called once the workers are up (a verb writes its
    manifest then: the workers know which model they loaded). Returns when
    every problem is done; raises if every worker is lost, and on
    cancellation stops the workers and merges what they recorded.
    """
    run_dir = Path(run_dir)
    (run_dir / SHARDS).mkdir(parents=True, exist_ok=True)
    total_cpus = None
    if options.address is None and options.workers:
        total_cpus = max(1, math.ceil(options.workers * options.worker_cpus))
    with connected(options.address, num_cpus=total_cpus) as ray:
        driver = Driver(ray, run_dir, problems, setup, options, progress)
        try:
            await driver.claim()
            driver.plan_work()
            if driver.todo:
                await driver.start_workers()
            if on_started is not None:
                on_started(driver.run)
            with progress if progress is not None else contextlib.nullcontext():
                await driver.drive(samples_hint)
                await driver.poll()
        finally:
            await driver.stop()
    return driver.run
