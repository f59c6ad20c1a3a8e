"""Kernels for the execution service: fresh ones per stateless request, and named sessions.

A stateless request takes a fresh pool kernel and releases it at once (at most
``concurrency`` at a time; ``max_queued`` more wait, beyond that the request is
refused as busy). A session is one pool kernel, created by its first request;
its requests run one at a time in arrival order (an ``asyncio.Lock`` is FIFO),
sessions run in parallel. Idle sessions expire after ``session_ttl_s``; a full
table of ``max_sessions`` refuses new ones as busy, with the time until the
next expiry as the hint to retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import SandboxError
from sandbox.fork import Forked, RecordedCell
from sandbox.kernel import Kernel
from sandbox.pool import KernelPool
from sandbox.result import CellResult


class Busy(SandboxError):
    """No room for the request now; ``retry_after`` seconds is a fair wait."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoSuchSession(SandboxError):
    """The session id names no live session (never created, deleted or expired)."""


@dataclass(frozen=True)
class ServiceLimits:
    max_sessions: int = 32
    session_ttl_s: float = 600.0
    concurrency: int = 8  # stateless requests running at once, each in its own fresh kernel
    max_queued: int = 256  # stateless requests waiting for a slot; beyond that: busy
    max_timeout_s: float = 300.0  # the longest deadline a request may ask for
    max_cells: int = 256  # cells of one /run_jupyter request


@dataclass(eq=False)
class Session:
    id: str
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    kernel: Kernel | None = None
    last_used: float = field(default_factory=time.monotonic)
    # Cells run since the kernel's state began (what a fork replays).
    cells: list[RecordedCell] = field(default_factory=list)
    # The state callers built is gone and they were not told yet (new, expired, replaced).
    state_lost: bool = True
    restarts_seen: int = 0
    closed: bool = False
    forked_from: str | None = None


@dataclass(frozen=True)
class Outcome:
    result: CellResult
    # True when the request did not find the session's earlier state (see sandbox.service.nemo).
    new_session: bool


class Service:
    def __init__(self, pool: KernelPool, limits: ServiceLimits) -> None:
        self.pool = pool
        self.limits = limits
        self._sessions: dict[str, Session] = {}
        self._slots = asyncio.Semaphore(limits.concurrency)
        self._queued = 0
        self._running = 0
        self._expiry: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        await self.pool.start()
        self._expiry = asyncio.create_task(self._expire_loop())

    async def close(self) -> None:
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(self._drop(s) for s in sessions), return_exceptions=True)
        await self.pool.close()

    # --- stateless requests ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def fresh_kernel(self) -> AsyncIterator[Kernel]:
        """A fresh kernel for one request, released when the block ends."""
        if self._slots.locked() and self._queued >= self.limits.max_queued:
            raise Busy(f"the server is busy ({self.limits.concurrency} requests running, "
                       f"{self._queued} waiting); retry later", retry_after=1)
        self._queued += 1
        try:
            await self._slots.acquire()
        finally:
            self._queued -= 1
        self._running += 1
        try:
            kernel = await self.pool.acquire()
            try:
                yield kernel
            finally:
                await self.pool.release(kernel)
        finally:
            self._running -= 1
            self._slots.release()

    # --- sessions -----------------------------------------------------------------

    def _retry_after(self) -> int:
        now = time.monotonic()
        waits = [s.last_used + self.limits.session_ttl_s - now for s in self._sessions.values()]
        return max(1, math.ceil(min(waits, default=1.0)))

    def _admit(self, sid: str) -> Session:
        if len(self._sessions) >= self.limits.max_sessions:
            raise Busy(f"{self.limits.max_sessions} sessions are open, the most this server keeps; delete one "
                       f"or retry when an idle one expires", retry_after=self._retry_after())
        session = Session(sid)
        self._sessions[sid] = session
        return session

    def get(self, sid: str) -> Session:
        session = self._sessions.get(sid)
        if session is None:
            raise NoSuchSession(f"no session {sid!r} (never created, deleted, or expired)")
        return session

    async def execute(self, sid: str, code: str, timeout: float | None) -> Outcome:
        """Run one cell in session ``sid``, creating the session if it does not exist."""
        while True:
            session = self._sessions.get(sid) or self._admit(sid)
            async with session.lock:
                if session.closed:
                    continue  # deleted or expired while this request waited: a new one
                kernel = await self._kernel_of(session)
                result = await kernel.execute(code, timeout)
                self._account(session, kernel, code, timeout, result)
                lost, session.state_lost = session.state_lost, False
                return Outcome(result, new_session=lost or result.restarted)

    async def _kernel_of(self, session: Session) -> Kernel:
        if session.kernel is None:
            try:
                session.kernel = await self.pool.acquire()
            except BaseException:
                self._sessions.pop(session.id, None)
                session.closed = True
                raise
            session.restarts_seen = 0
        return session.kernel

    def _account(self, session: Session, kernel: Kernel, code: str, timeout: float | None,
                 result: CellResult) -> None:
        session.last_used = time.monotonic()
        restarts = int(kernel.info["restarts"])
        if restarts != session.restarts_seen:
            # Replaced (died, or killed after a deadline), in this request or before it.
            session.restarts_seen = restarts
            session.cells.clear()
            session.state_lost = True
        if not result.restarted:
            limit = self.pool.policy.timeout_s if timeout is None else timeout
            session.cells.append(RecordedCell(code=code, timeout_s=limit, result=result))

    async def delete(self, sid: str) -> None:
        session = self.get(sid)
        self._sessions.pop(sid, None)
        await self._drop(session)

    async def _drop(self, session: Session) -> None:
        session.closed = True
        kernel, session.kernel = session.kernel, None
        if kernel is not None:
            await self.pool.release(kernel)

    async def fork(self, sid: str) -> tuple[str, Forked]:
        """A new session holding a copy of ``sid``'s state as of its requests so far."""
        source = self.get(sid)
        new_id = secrets.token_hex(16)
        session = self._admit(new_id)
        session.forked_from = sid
        async with session.lock:
            try:
                # After the requests already queued on the source: the state they leave.
                async with source.lock:
                    if source.closed or source.kernel is None:
                        raise NoSuchSession(f"session {sid!r} was deleted or expired before the fork")
                    cells = list(source.cells)
                    session.kernel, forked = await self.pool.fork(source.kernel, cells)
            except BaseException:
                self._sessions.pop(new_id, None)
                session.closed = True
                raise
            session.cells = cells
            session.state_lost = False
            session.last_used = time.monotonic()
        return new_id, forked

    async def _expire_loop(self) -> None:
        period = max(0.05, min(self.limits.session_ttl_s / 4, 5.0))
        while True:
            await asyncio.sleep(period)
            await self.expire()

    async def expire(self) -> int:
        """Close sessions idle for longer than the TTL (never one with a request running or waiting)."""
        now = time.monotonic()
        idle = [s for s in self._sessions.values()
                if not s.lock.locked() and now - s.last_used > self.limits.session_ttl_s]
        for s in idle:
            self._sessions.pop(s.id, None)
        await asyncio.gather(*(self._drop(s) for s in idle), return_exceptions=True)
        return len(idle)

    def sessions(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {s.id: {"idle_s": round(now - s.last_used, 3), "cells": len(s.cells), "busy": s.lock.locked(),
                       # The kernel's init on the host (its pid namespace dies with it).
                       "kernel_pid": s.kernel.info["pid"] if s.kernel is not None else None,
                       **({"forked_from": s.forked_from} if s.forked_from else {})}
                for s in self._sessions.values()}

    def health(self) -> dict[str, Any]:
        return {
            "status": "healthy",
            "sessions": len(self._sessions),
            "max_sessions": self.limits.max_sessions,
            "running": self._running,
            "queued": self._queued,
            "pool": {"ready": self.pool.ready, "starting": self.pool.starting},
            "limits": self.pool.policy.limits_summary(),
        }
