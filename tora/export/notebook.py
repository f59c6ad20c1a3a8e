"""One Jupyter notebook (nbformat 4) per trajectory, for review.

Cells: a markdown cell with the problem (and, for a failed trajectory, its
finish and error), then per turn a markdown cell with the model's text and a
code cell with the executed code and its recorded outputs (stdout and stderr
streams, display data, the error with its traceback; a timeout or a dead
kernel as an stderr stream with what the model was shown), and a last
markdown cell with the final text and the verdict. A code block that never
got its result (an interrupted trajectory) is a code cell without outputs.
Every trajectory is exported, failed ones included: reviewing them is the
point. The record's identity is kept in the notebook's metadata (`tora`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tora.errors import UsageError
from tora.export.view import error_view, failed, meta, question_text, review_turns
from tora.record import ExecutionStep, Trajectory


def _nbformat() -> Any:
    try:
        import nbformat
    except ModuleNotFoundError as exc:
        raise UsageError("the ipynb format needs nbformat: pip install 'tora-tir[export]'") from exc
    return nbformat


def _outputs(nbf: Any, execution: ExecutionStep) -> list[Any]:
    out: list[Any] = []
    if execution.stdout:
        out.append(nbf.v4.new_output("stream", name="stdout", text=execution.stdout))
    if execution.stderr:
        out.append(nbf.v4.new_output("stream", name="stderr", text=execution.stderr))
    out.extend(nbf.v4.new_output("display_data", data={"text/plain": d}) for d in execution.display)
    if execution.error is not None:
        err = execution.error
        out.append(nbf.v4.new_output("error", ename=err.ename, evalue=err.evalue, traceback=list(err.traceback)))
    elif execution.status != "ok":
        out.append(nbf.v4.new_output("stream", name="stderr", text=f"[{execution.status}] {execution.rendered}\n"))
    return out


def _heading(t: Trajectory) -> str:
    lines = [f"# {t.problem.id} (sample {t.sample_index})", "", question_text(t), ""]
    if t.problem.answer is not None:
        lines.append(f"**Reference answer:** `{t.problem.answer}`")
    if failed(t):
        err = error_view(t)
        detail = "" if err is None else f": {err.kind + ': ' if err.kind else ''}{err.message}"
        lines.append(f"**This trajectory did not finish** (`{t.result.finish}`){detail}")
    return "\n".join(lines)


def _verdict(t: Trajectory) -> str:
    r = t.result
    verdict = {True: "correct", False: "wrong", None: r.grade_status or "ungraded"}[r.correct]
    return (f"**Final answer:** `{r.final_answer}` ({verdict}; finish `{r.finish}`"
            + (f", grader {r.grader}" if r.grader else "") + ")")


def notebook(t: Trajectory) -> Any:
    nbf = _nbformat()
    cells: list[Any] = [nbf.v4.new_markdown_cell(_heading(t))]
    count = 0
    for turn in review_turns(t):
        if turn.text.strip():
            cells.append(nbf.v4.new_markdown_cell(turn.text))
        if turn.code is None:
            continue
        if turn.execution is None:
            cells.append(nbf.v4.new_code_cell(turn.code, metadata={"tora": {"status": "not run"}}))
            continue
        count += 1
        cells.append(nbf.v4.new_code_cell(turn.code, execution_count=count, outputs=_outputs(nbf, turn.execution),
                                          metadata={"tora": {"status": turn.execution.status}}))
    cells.append(nbf.v4.new_markdown_cell(_verdict(t)))
    nb = nbf.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["tora"] = meta(t)
    return nb


def notebook_name(t: Trajectory) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", t.problem.id).strip("-.")[:80] or "problem"
    return f"{slug}-s{t.sample_index}-{t.id[:8]}.ipynb"


def write_notebook(t: Trajectory, folder: Path) -> Path:
    nbf = _nbformat()
    nb = notebook(t)
    nbf.validate(nb)
    path = folder / notebook_name(t)
    tmp = path.with_name(f".{path.name}.tmp")
    nbf.write(nb, str(tmp))
    tmp.replace(path)
    return path
