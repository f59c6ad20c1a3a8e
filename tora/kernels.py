"""Where episodes get their kernels: the sandbox package, seen from tora."""

from __future__ import annotations

from sandbox import Kernel, KernelPool, SandboxPolicy, start_kernel

__all__ = ["FreshKernels", "KernelPool", "SandboxPolicy", "policy_for"]


def policy_for(timeout_s: float) -> SandboxPolicy:
    return SandboxPolicy(timeout_s=timeout_s)


class FreshKernels:
    """One kernel started per acquire, for one-off solves where a warm pool
    would cost more to fill than it saves."""

    def __init__(self, policy: SandboxPolicy) -> None:
        self.policy = policy

    async def acquire(self) -> Kernel:
        return await start_kernel(self.policy)

    async def release(self, kernel: Kernel) -> None:
        await kernel.shutdown()
