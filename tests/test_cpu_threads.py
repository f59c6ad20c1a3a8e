"""llama.cpp's thread count follows the idle cores (tora/backends/cpu_threads.py says why)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tora.backends import cpu_threads
from tora.errors import ModelSpecError


@pytest.mark.parametrize(("cpus", "idle", "threads"), [
    (2, 2.0, 2), (2, 1.75, 2), (2, 1.6, 1), (2, 1.0, 1), (2, 0.0, 1),  # a busy core costs a thread
    (8, 5.8, 6), (8, 8.0, 8), (1, 0.2, 1), (4, None, 4),  # None: /proc/stat unreadable, all of them
])
def test_threads_follow_the_idle_cores(cpus: int, idle: float | None, threads: int) -> None:
    assert cpu_threads.pick(cpus, idle) == threads


def test_idle_cores_sees_a_busy_process() -> None:
    """A real measurement against a control taken in the same test: one spinning process
    leaves at least a core's share less idle (the machine may be busy with other work too)."""
    quiet = cpu_threads.idle_cores(0.3)
    assert quiet is not None and 0.0 <= quiet <= cpu_threads.usable_cpus() + 0.01
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        busy = min(cpu_threads.idle_cores(0.3) or 0.0 for _ in range(3))
    finally:
        spinner.kill()
        spinner.wait()
    assert busy <= max(0.3, quiet - 0.5)  # on a machine already saturated both are near 0


def test_the_environment_fixes_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORA_LLAMA_THREADS", "3")
    assert cpu_threads.now() == 3
    monkeypatch.setenv("TORA_LLAMA_THREADS", "0")
    with pytest.raises(ModelSpecError, match="TORA_LLAMA_THREADS='0': expected a positive whole number"):
        cpu_threads.now()
