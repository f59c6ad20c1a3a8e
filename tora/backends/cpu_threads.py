"""How many threads llama.cpp should compute with, decided before each model call.

ggml's threads meet at a spinning barrier after every operation (hundreds per
token). When the machine has fewer idle cores than llama.cpp has threads, a
thread that the OS has descheduled holds all the others spinning at that
barrier. On a 2-core machine with other work running (a kernel executing a
cell, the sandbox pool or the graders starting at the beginning of an eval,
another program), 2 threads decoded Qwen2.5-Coder 1.5B at 0.42 tok/s and 1
thread at 4.9 tok/s (measured side by side, load average 11-13); that collapse
is what made the first problem of a run take from 56 s to over 1000 s. So the
count follows the idle cores, measured over a short window just before the call:
all the cores on a quiet machine, fewer as others get busy, never below one.

`TORA_LLAMA_THREADS=N` fixes the count.
"""

from __future__ import annotations

import math
import os
import time

ENV = "TORA_LLAMA_THREADS"
WINDOW_S = 0.05


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def fixed() -> int | None:
    """The count `TORA_LLAMA_THREADS` sets, or None."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        from tora.errors import ModelSpecError

        raise ModelSpecError(f"{ENV}={raw!r}: expected a positive whole number of threads")
    return value


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 5:
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user..steal


def idle_cores(window_s: float = WINDOW_S) -> float | None:
    """Cores left idle by everything on the machine over the next `window_s` (None: cannot tell)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(window_s)
    after = _cpu_times()
    if after is None or after[1] <= before[1]:
        return None
    cores = os.cpu_count() or 1
    return cores * (after[0] - before[0]) / (after[1] - before[1])


def pick(cpus: int | None = None, idle: float | None = None) -> int:
    """Threads for the next call: the idle cores (rounded up from 0.7), between 1 and the usable CPUs."""
    cpus = cpus or usable_cpus()
    if idle is None:  # no /proc/stat: all of them, as before
        return cpus
    return max(1, min(cpus, math.floor(idle + 0.3)))


def now() -> int:
    """The count for a call about to start: `TORA_LLAMA_THREADS`, else from the idle cores."""
    return fixed() or pick(usable_cpus(), idle_cores())
