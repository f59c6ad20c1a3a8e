"""Connecting to Ray: an existing cluster (`--address`), or a private one on this machine, on loopback.

Ray picks the address its daemons listen on when `ray` is imported: on
Linux, the machine's own non-loopback address, and every listener (GCS,
raylet, workers, the runtime-env agent) binds all interfaces, even with
`--node-ip-address=127.0.0.1`. With `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`
Ray treats the machine as a single-node cluster and binds everything to
127.0.0.1 (checked with `ss -ltnp`; the test suite asserts it). A private
cluster therefore sets that, and turns off Ray's usage reporting (which
would call out), before Ray is imported; the daemons it starts inherit both.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from types import ModuleType

from tora.errors import UsageError

NAMESPACE = "tora"
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def require_ray() -> ModuleType:
    try:
        import ray
    except ModuleNotFoundError as exc:
        if exc.name != "ray":
            raise
        raise UsageError("--engine ray needs Ray: pip install 'tora-tir[ray]'") from None
    return ray


def loopback_ready() -> bool:
    """Whether a cluster started from this process would listen on loopback only."""
    if "ray" not in sys.modules:
        return True  # `connected` sets the environment before the import
    from ray._private import ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER


def _connected_ray() -> ModuleType | None:
    ray = sys.modules.get("ray")
    return ray if ray is not None and ray.is_initialized() else None


@contextlib.contextmanager
def connected(address: str | None, *, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """Ray, connected: to `address`, or to a private cluster on loopback that is stopped on the way out.

    A process already connected (a test, a notebook, a benchmark that built
    its own cluster) is used as it is and left connected.
    """
    ray = _connected_ray()
    if ray is not None:
        yield ray
        return
    if address is None:
        if not loopback_ready():
            raise UsageError("ray was imported before tora could keep a private cluster on loopback: set "
                             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing it, or pass --address")
        os.environ.update(LOOPBACK_ENV)
        os.environ.pop("RAY_ADDRESS", None)  # ray.init() would join that cluster instead
    ray = require_ray()
    # Ray's notices at start-up (token authentication, the dashboard) would break into the progress table.
    logging.getLogger("ray").setLevel(logging.ERROR)
    kwargs: dict[str, object] = {"namespace": NAMESPACE, "log_to_driver": False, "logging_level": logging.ERROR,
                                 "configure_logging": True}
    if address is None:
        kwargs.update(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError) as exc:
        raise UsageError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    try:
        yield ray
    finally:
        ray.shutdown()
