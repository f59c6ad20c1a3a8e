"""Where episodes get their kernels: the sandbox package, seen from tora."""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from sandbox import Kernel, KernelPool, SandboxPolicy, start_kernel
from tora.errors import UsageError

__all__ = ["FreshKernels", "KernelPool", "SandboxPolicy", "sandbox_policy"]

ENV_PREFIX = "TORA_SANDBOX_"


def _from_env() -> dict[str, Any]:
    """TORA_SANDBOX_<FIELD> for any SandboxPolicy field, e.g. TORA_SANDBOX_TMP_MB=64."""
    fields = SandboxPolicy.model_fields
    found: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name not in fields:
                raise UsageError(f"{key}: no sandbox limit is called {name!r}; known: {', '.join(fields)}")
            found[name] = value
    return found


def sandbox_policy(*, timeout_s: float | None = None, isolation: str | None = None, memory_mb: int | None = None,
                   **flags: Any) -> SandboxPolicy:
    """The sandbox policy in force: the one function every kernel user builds it with (trajectories,
    `tora sandbox check/exec/serve`, replay, lm-eval), so a diagnostic never reports another policy.

    Each setting: the flag (None: not given) > TORA_ISOLATION / TORA_MEMORY_MB > TORA_SANDBOX_<FIELD>
    > the policy's default.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    if isolation is None:
        isolation = os.environ.get("TORA_ISOLATION") or None
    if memory_mb is None and os.environ.get("TORA_MEMORY_MB"):
        given["memory_mb"] = os.environ["TORA_MEMORY_MB"]
    for name, value in (("isolation", isolation), ("memory_mb", memory_mb), ("timeout_s", timeout_s)):
        if value is not None:
            given[name] = value
    values = {**_from_env(), **given}
    try:
        return SandboxPolicy(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UsageError(f"sandbox limit '{err['loc'][0]}': {err['msg']}") from exc


class FreshKernels:
    """One kernel started per acquire, for one-off solves where a warm pool
    would cost more to fill than it saves."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy

    async def acquire(self) -> Kernel:
        return await start_kernel(self.policy)

    async def release(self, kernel: Kernel) -> None:
        await kernel.shutdown()
