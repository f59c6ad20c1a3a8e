"""Where episodes get their kernels: the sandbox package, seen from tora."""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from sandbox import Kernel, KernelPool, SandboxPolicy, start_kernel
from tora.engine import SolveConfig
from tora.errors import UsageError

__all__ = ["FreshKernels", "KernelPool", "SandboxPolicy", "policy_for"]

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


def policy_for(config: SolveConfig) -> SandboxPolicy:
    """The sandbox policy: flags > TORA_SANDBOX_* environment > defaults."""
    values = {**_from_env(), **config.sandbox, "timeout_s": config.timeout_s}
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
