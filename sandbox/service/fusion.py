"""SandboxFusion's wire format (bytedance/SandboxFusion: ``sandbox/server/sandbox_api.py``,
``sandbox/runners/types.py``), as its client package ``sandbox-fusion`` sends and reads it.

``POST /run_code`` runs ``code`` as one cell of a fresh kernel; ``POST /run_jupyter`` runs
``cells`` in order in one fresh kernel. Only Python is served: any other ``language``
is refused with SandboxFusion's own validation error (FastAPI's ``{"detail": [...]}``, 422).

How a cell maps onto a process's outcome (what SandboxFusion's python runner reports):
an exception is return code 1 with the traceback on stderr; ``sys.exit(n)`` is return
code n; a kernel that died (killed, out of memory) is -9; the deadline is
``TimeLimitExceeded``. A machine-side failure (no kernel could start) is ``SandboxError``.
"""

from __future__ import annotations

import posixpath
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sandbox.result import CellResult

# Every language SandboxFusion knows (its ``Language``): the others are refused by name.
KNOWN_LANGUAGES = (
    "python", "python2", "cpp", "nodejs", "go", "go_test", "java", "php", "csharp", "bash", "typescript", "sql",
    "rust", "cuda", "lua", "R", "perl", "D_ut", "ruby", "scala", "julia", "pytest", "junit", "kotlin_script",
    "jest", "verilog", "python_gpu", "lean", "swift", "racket",
)  # fmt: skip


class RunStatus(StrEnum):
    Success = "Success"
    Failed = "Failed"
    SandboxError = "SandboxError"


class CommandRunStatus(StrEnum):
    Finished = "Finished"
    Error = "Error"
    TimeLimitExceeded = "TimeLimitExceeded"


def _relative_path(path: str) -> str:
    """A path inside the kernel's work dir, as given (SandboxFusion joins it to the run's cwd)."""
    norm = posixpath.normpath(path)
    if not path or posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"{path!r} is not a file path inside the work dir")
    return path


class _Files(BaseModel):
    files: dict[str, str | None] = Field(default_factory=dict, description="path -> base64 content")
    fetch_files: list[str] = Field(default_factory=list)

    @field_validator("files")
    @classmethod
    def _files_inside(cls, files: dict[str, str | None]) -> dict[str, str | None]:
        for path in files:
            _relative_path(path)
        return files

    @field_validator("fetch_files")
    @classmethod
    def _fetch_inside(cls, paths: list[str]) -> list[str]:
        for path in paths:
            _relative_path(path)
        return paths


class RunCodeRequest(_Files):
    model_config = ConfigDict(extra="ignore")

    code: str
    language: str
    compile_timeout: float = Field(default=10, ge=0)
    run_timeout: float = Field(default=10, gt=0)
    memory_limit_MB: int = Field(default=-1, ge=-1)
    stdin: str | None = None

    @field_validator("language")
    @classmethod
    def _python_only(cls, language: str) -> str:
        if language not in KNOWN_LANGUAGES:
            raise ValueError(f"unknown language {language!r}; SandboxFusion's languages are {', '.join(KNOWN_LANGUAGES)}")
        if language != "python":
            raise ValueError(f"language {language!r} is not served here: tora's sandbox runs 'python' only")
        return language


class RunJupyterRequest(_Files):
    model_config = ConfigDict(extra="ignore")

    cells: list[str]
    cell_timeout: float = Field(default=0, ge=0, description="per cell; 0: only total_timeout")
    total_timeout: float = Field(default=45, gt=0)
    memory_limit_MB: int = Field(default=-1, ge=-1)
    kernel: Literal["python3"] = "python3"


class CommandRunResult(BaseModel):
    status: CommandRunStatus
    execution_time: float | None = None
    return_code: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class RunCodeResponse(BaseModel):
    status: RunStatus
    message: str
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None = None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


class CellRunResult(BaseModel):
    stdout: str
    stderr: str
    display: list[dict[str, Any]]
    error: list[dict[str, Any]]


class RunJupyterResponse(BaseModel):
    status: RunStatus
    message: str
    driver: CommandRunResult | None = None
    cells: list[CellRunResult] = Field(default_factory=list)
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


# What IPython adds to stderr when a cell calls sys.exit(); a script prints none of it.
_EXIT_NOISE = re.compile(
    r"^.*UserWarning: To exit: use 'exit', 'quit', or Ctrl-D\.\n(?:  warn\(.*\n)?"
    r"|^An exception has occurred, use %tb to see the full traceback\.\n"
    r"|^SystemExit: .*\n",
    re.MULTILINE,
)


def _exit_value(result: CellResult) -> str | None:
    """The argument of sys.exit() when the cell called it, else None."""
    if result.error is None or result.error.ename != "SystemExit":
        return None
    return result.error.evalue.strip()


def traceback_text(result: CellResult) -> str:
    """The error as a script's stderr would show it (IPython's Plain traceback)."""
    if result.error is None:
        return ""
    lines = result.error.traceback or [f"{result.error.ename}: {result.error.evalue}"]
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def return_code(result: CellResult) -> int:
    if result.status == "died":
        return -9
    if result.error is None:
        return 0
    value = _exit_value(result)
    if value is None:
        return 1
    if value in ("", "None"):
        return 0
    return int(value) if value.lstrip("-").isdigit() else 1


def run_result(result: CellResult) -> CommandRunResult:
    """One cell seen as one run of ``python file.py``."""
    if result.status == "timeout":
        return CommandRunResult(status=CommandRunStatus.TimeLimitExceeded, execution_time=result.duration_s,
                                stdout=result.stdout, stderr=result.stderr + traceback_text(result))
    stderr = result.stderr
    value = _exit_value(result)
    if value is not None:
        # As the interpreter does: a non-numeric argument is printed, a number is the status.
        stderr = _EXIT_NOISE.sub("", stderr)
        if value not in ("", "None") and not value.lstrip("-").isdigit():
            stderr += value + "\n"
    elif result.error is not None:
        stderr += traceback_text(result)
    stdout = result.stdout + "".join(text if text.endswith("\n") else text + "\n" for text in result.display)
    return CommandRunResult(status=CommandRunStatus.Finished, execution_time=result.duration_s,
                            return_code=return_code(result), stdout=stdout, stderr=stderr)


def status_of(run: CommandRunResult) -> RunStatus:
    """SandboxFusion's ``parse_run_status``: a deadline or a non-zero return code is Failed."""
    if run.status == CommandRunStatus.Error:
        return RunStatus.SandboxError
    if run.status == CommandRunStatus.TimeLimitExceeded or run.return_code != 0:
        return RunStatus.Failed
    return RunStatus.Success


def cell_result(result: CellResult) -> CellRunResult:
    errors = []
    if result.error is not None:
        errors.append({"ename": result.error.ename, "evalue": result.error.evalue,
                       "traceback": list(result.error.traceback)})
    return CellRunResult(stdout=result.stdout, stderr=result.stderr,
                         display=[{"text/plain": text} for text in result.display], error=errors)


def as_script(code: str) -> str:
    """The code as a script runs it: a trailing expression is not echoed (IPython shows the last one)."""
    return code + "\npass\n"
