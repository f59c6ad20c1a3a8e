"""NeMo-Skills' wire format (NVIDIA/NeMo-Skills: ``nemo_skills/code_execution/sandbox.py``
and ``local_sandbox/local_sandbox_server.py``), as its ``LocalSandbox`` client sends and reads it.

``POST /execute`` with ``language: "ipython"`` runs the code in the stateful session named by the
``X-Session-ID`` header (created by its first request, as NeMo-Skills' server does);
``"python"``/``"python3"`` run it alone in a fresh kernel with ``std_input`` as stdin.
``new_session_created`` is true whenever the request did not find the session's earlier state:
the session was new (first request, or expired), or its kernel died or was killed after a
deadline and was replaced, during this request or since the last one. NeMo-Skills' client
then replays its recorded cells. Errors are ``{"error": message}`` with a 4xx status.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sandbox.result import CellResult

STATEFUL = "ipython"
STATELESS = ("python", "python3")
CUT = "<output cut>"


class ExecuteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    generated_code: str
    timeout: float | None = Field(default=None, gt=0, description="seconds; absent: the server's cell timeout")
    language: str = STATEFUL
    std_input: str = ""
    max_output_characters: int = Field(default=1000, ge=0)
    # NeMo-Skills' client sends it; tora's kernels always show Plain tracebacks.
    traceback_verbosity: str = "Plain"


ProcessStatus = Literal["completed", "error", "timeout"]


class ExecuteResponse(BaseModel):
    process_status: ProcessStatus
    stdout: str
    stderr: str
    new_session_created: bool = False


def cut(text: str, limit: int) -> str:
    return text[:limit] + CUT if len(text) > limit else text


def execute_response(result: CellResult, max_chars: int, new_session: bool, timeout: float) -> ExecuteResponse:
    """What NeMo-Skills' IPython session answers: the output, displayed values and traceback on stdout."""
    stdout = result.stdout + "".join(text if text.endswith("\n") else text + "\n" for text in result.display)
    stderr = result.stderr
    status: ProcessStatus = "completed"
    if result.status == "timeout":
        status = "timeout"
        how = "; the kernel was killed and its state lost" if result.restarted else ""
        stderr += f"Execution timed out after {timeout:g} seconds{how}\n"
    elif result.error is not None:
        status = "error"
        lines = result.error.traceback or [f"{result.error.ename}: {result.error.evalue}"]
        stdout += "".join(line if line.endswith("\n") else line + "\n" for line in lines)
    return ExecuteResponse(process_status=status, stdout=cut(stdout, max_chars), stderr=cut(stderr, max_chars),
                           new_session_created=new_session or result.restarted)
