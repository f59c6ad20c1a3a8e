"""Exceptions the sandbox raises. Each message says what the user can do about it.

User code never causes these: whatever a cell does ends up in a ``CellResult``.
These are for problems of the machine or the configuration.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base class: the sandbox could not do what was asked."""


class KernelStartError(SandboxError):
    """A kernel did not come up (bad interpreter, missing ipykernel, sandbox refused to start)."""


class IsolationUnavailableError(SandboxError):
    """The isolation tier the policy asks for is not available on this machine."""


class KernelClosedError(SandboxError):
    """The kernel was shut down and cannot run cells any more."""
