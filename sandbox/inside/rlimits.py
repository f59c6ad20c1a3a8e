"""The kernel's rlimits: stdlib only."""

from __future__ import annotations

import resource


def apply_limits(limits: dict[str, int]) -> dict[str, int]:
    """Set rlimits for this process and everything it starts; returns those that took."""
    mb = 1024 * 1024
    table = {
        "memory_mb": (resource.RLIMIT_AS, mb),
        "max_file_mb": (resource.RLIMIT_FSIZE, mb),
        "cpu_time_s": (resource.RLIMIT_CPU, 1),
        "max_open_files": (resource.RLIMIT_NOFILE, 1),
        "max_procs": (resource.RLIMIT_NPROC, 1),
    }
    applied: dict[str, int] = {}
    for key, (which, unit) in table.items():
        if key in limits:
            value = int(limits[key]) * unit
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                continue
            applied[key] = int(limits[key])
    # A core dump of a 2 GB kernel would fill the work dir.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return applied
