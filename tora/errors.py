"""One exception hierarchy for tora. Every message says what to do next."""

from __future__ import annotations


class ToraError(Exception):
    """Base class; the CLI maps it to exit code 1 unless a subclass says otherwise."""

    exit_code = 1


class UsageError(ToraError):
    """The user asked for something malformed (bad flag, bad model spec). Exit 2."""

    exit_code = 2


class ModelSpecError(UsageError):
    """A `--model SPEC` that names no known backend or points at nothing."""


class PromptError(UsageError):
    """A prompt template that does not exist or cannot be filled."""


class DataError(UsageError):
    """Bad input data. The message names the file, the line and the field."""

    def __init__(self, path: object, line: int | None, field: str | None, problem: str) -> None:
        where = f"{path}" + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {problem}")
        self.path, self.line, self.field = path, line, field


class BackendError(ToraError):
    """A model backend failed at run time (load error, engine crash)."""


class RecordError(ToraError):
    """A trajectory file could not be read or written safely."""


class KernelError(ToraError):
    """The kernel a trajectory was using stopped working (not a cell's own failure)."""


class GraderError(ToraError):
    """A grader failed on an answer (crash, not a verdict)."""


def error_kind(exc: BaseException) -> str:
    """Whose fault a failure is, for `result.error.kind`."""
    from sandbox.errors import KernelClosedError, SandboxError

    if isinstance(exc, BackendError):
        return "backend"
    if isinstance(exc, KernelError | KernelClosedError):
        return "kernel"
    if isinstance(exc, SandboxError):
        return "sandbox"
    if isinstance(exc, GraderError):
        return "grader"
    return "internal"
