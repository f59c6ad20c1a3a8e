"""One pydantic model holding every limit the sandbox enforces."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Isolation = Literal["auto", "bwrap", "landlock", "none"]

# Variables copied from the runtime's environment into a kernel. Everything else
# (API keys, tokens, proxy settings) stays out.
DEFAULT_ENV_ALLOW: tuple[str, ...] = ("LANG", "LC_ALL", "LC_CTYPE", "TZ")


class SandboxPolicy(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=10.0, gt=0, description="wall time per cell")
    interrupt_grace_s: float = Field(
        default=1.0,
        ge=0,
        description="after a timeout, how long an interrupt may take before the kernel is killed",
    )
    start_timeout_s: float = Field(default=60.0, gt=0, description="how long a kernel may take to come up")
    memory_mb: int = Field(
        default=2048,
        ge=64,
        description="memory of the kernel's processes together, tmpfs included (memory cgroup); "
        "also each process's address space (RLIMIT_AS)",
    )
    max_output_bytes: int = Field(
        default=1_000_000, ge=256, description="stdout+stderr+display kept per cell"
    )
    max_procs: int = Field(default=64, ge=4, description="processes and threads per kernel")
    max_file_mb: int = Field(default=256, ge=1, description="largest file a kernel may write (RLIMIT_FSIZE)")
    tmp_mb: int = Field(default=256, ge=1, description="size of the kernel's private /tmp")
    work_mb: int = Field(default=256, ge=1, description="size of the kernel's work dir (a tmpfs in the bwrap tier)")
    shm_mb: int = Field(default=16, ge=1, description="size of the kernel's /dev/shm (bwrap tier)")
    max_inodes: int = Field(
        default=10_000, ge=64, description="files and dirs in each of /tmp, the work dir and /dev/shm"
    )
    cpu_time_s: int = Field(
        default=3600, ge=1, description="total CPU seconds over a kernel's life (RLIMIT_CPU)"
    )
    max_open_files: int = Field(default=256, ge=64, description="RLIMIT_NOFILE")
    isolation: Isolation = "auto"
    uid: int | None = Field(
        default=None,
        ge=1,
        description="host uid kernels run as when the runtime is root "
        "(default: the tora-sandbox user, else 2100000000)",
    )
    env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW
    env: dict[str, str] = Field(default_factory=dict, description="extra variables set in the kernel")
    preimport: tuple[str, ...] = Field(
        default=("numpy", "sympy"), description="modules the zygote imports before forking kernels"
    )

    def limits_summary(self) -> dict[str, float | int]:
        return {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "max_output_bytes": self.max_output_bytes,
            "max_procs": self.max_procs,
            "max_file_mb": self.max_file_mb,
            "tmp_mb": self.tmp_mb,
            "work_mb": self.work_mb,
            "shm_mb": self.shm_mb,
            "max_inodes": self.max_inodes,
            "cpu_time_s": self.cpu_time_s,
        }
