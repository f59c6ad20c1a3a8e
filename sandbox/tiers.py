"""Probe which isolation the machine offers and build the matching launcher."""

from __future__ import annotations

from sandbox.launch import Launcher, SubprocessLauncher
from sandbox.policy import SandboxPolicy


def launcher_for(policy: SandboxPolicy) -> Launcher:
    return SubprocessLauncher(policy)
