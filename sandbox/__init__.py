"""Sandboxed, pooled Jupyter kernels for running model-written code.

This package knows nothing of models or of ``tora``; it runs cells and reports
what happened.
"""

from sandbox.errors import SandboxError
from sandbox.kernel import Kernel, start_kernel
from sandbox.policy import SandboxPolicy
from sandbox.pool import KernelPool
from sandbox.result import CellError, CellResult, CellStatus
from sandbox.tiers import SandboxReport, check

__all__ = [
    "CellError",
    "CellResult",
    "CellStatus",
    "Kernel",
    "KernelPool",
    "SandboxError",
    "SandboxPolicy",
    "SandboxReport",
    "check",
    "start_kernel",
]
