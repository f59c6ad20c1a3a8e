"""Hand-built trajectory records, shaped as the engine records them.

Built through the pydantic schema with the real prompt template, the real
renderer and the real observation framing (tora.render), so the records are
what `Episode` writes: a text step ending with the ```python block (the stop
string ```output left out), the code step, the execution step whose
observation is the ```output block, and a final text step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tora.prompts import load_prompt
from tora.record import (
    CodeStep,
    ExecutionStep,
    Generation,
    Problem,
    PromptRef,
    Result,
    Runtime,
    Sampling,
    Step,
    TextStep,
    Trajectory,
)
from tora.record.schema import ExecError
from tora.render import observation, render_default

TEMPLATE = load_prompt("tora-gsm8k")
HOSTILE = '</script><img src=x onerror="document.title=\'PWNED\'"><script>alert(1)</script><!-- &amp; \u2028'


@dataclass
class Cell:
    code: str
    stdout: str = ""
    status: str = "ok"
    error: tuple[str, str, list[str]] | None = None  # ename, evalue, traceback


@dataclass
class Turn:
    prose: str
    cell: Cell
    fence: str = "```python\n{code}```\n"  # how the model wrote the block


@dataclass
class Spec:
    pid: str
    question: str
    answer: str | None
    turns: list[Turn] = field(default_factory=list)
    final: str = ""
    finish: str = "answered"
    correct: bool | None = None
    grade_status: str | None = "ok"
    final_answer: str | None = None
    sample_index: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str = "greedy"
    parent: str | None = None
    error: str | None = None
    interrupted_cell: str | None = None  # code the model wrote whose execution never finished
    ident: str | None = None


def execution(cell: Cell, after: str) -> ExecutionStep:
    err = None if cell.error is None else ExecError(ename=cell.error[0], evalue=cell.error[1], traceback=cell.error[2])
    step = ExecutionStep(status=cell.status, stdout=cell.stdout, error=err, rendered="", observation="")  # type: ignore[arg-type]
    rendered = render_default(step, 10.0)
    return step.model_copy(update={"rendered": rendered, "observation": observation(rendered, after)})


def build(spec: Spec) -> Trajectory:
    steps: list[Step] = []
    completion = ""
    for turn in spec.turns:
        text = turn.prose + turn.fence.format(code=turn.cell.code)
        steps.append(TextStep(content=text, finish_reason="stop"))
        completion += text
        steps.append(CodeStep(content=turn.cell.code))
        ex = execution(turn.cell, completion)
        steps.append(ex)
        completion += ex.observation
    if spec.interrupted_cell is not None:
        steps.append(TextStep(content=spec.final + f"```python\n{spec.interrupted_cell}```\n"))
        steps.append(CodeStep(content=spec.interrupted_cell))
    elif spec.final or not spec.turns:
        steps.append(TextStep(content=spec.final, finish_reason="stop"))
    extra = {"id": spec.ident} if spec.ident else {}
    t = Trajectory(
        **extra,
        problem=Problem(id=spec.pid, text=spec.question, answer=spec.answer, source="fixture", meta=spec.meta),
        sample_index=spec.sample_index,
        origin=spec.origin,  # type: ignore[arg-type]
        parent=spec.parent,
        generation=Generation(backend="replay", model="fixture", spec="replay:fixture",
                              prompt_template=PromptRef(name=TEMPLATE.name, sha256=TEMPLATE.sha256),
                              sampling=Sampling(), max_tool_calls=4),
        runtime=Runtime(),
        prompt=TEMPLATE.fill(spec.question),
        steps=steps,
        result=Result(final_answer=spec.final_answer, finish=spec.finish, error=spec.error,  # type: ignore[arg-type]
                      correct=spec.correct, grader="tora-compat" if spec.grade_status else None,
                      grade_status=spec.grade_status),
    )
    t.content_hash = t.compute_content_hash()
    return t


TRACEBACK = ["\x1b[0;31m---------------------------------------------------------------------------\x1b[0m",
             "\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"]


def corpus() -> list[Trajectory]:
    """One of each shape an exporter must handle."""
    return [build(s) for s in [
        # 0: two tool calls, correct, MATH-style meta
        Spec("alg-1", "What is 1+1?", "2", [Turn("Let's add.\n", Cell("print(1+1)\n", "2\n")),
                                           Turn("Check it twice.\n", Cell("x = 1+1\nprint(x*2)\n", "4\n"))],
             "So $\\boxed{2}$.", correct=True, final_answer="2", meta={"type": "Algebra", "level": "Level 1"}),
        # 1: an exception, then a wrong answer
        Spec("alg-2", "What is 6/0 + 3?", "3", [Turn("Divide.\n", Cell("print(6/0)\n", "", "error",
                                                                            ("ZeroDivisionError", "division by zero",
                                                                             TRACEBACK)))],
             "It is undefined, so $\\boxed{0}$.", correct=False, final_answer="0",
             meta={"type": "Algebra", "level": "Level 2"}),
        # 2: the model wrote ```output in place of the closing fence (an unclosed block), and an
        #    earlier block it never asked to run
        Spec("geo-1", "Area of a 2 by 3 rectangle?", "6",
             [Turn("First a sketch:\n```python\n# not run\n```\nNow:\n", Cell("print(2*3)\n", "6\n"),
                   fence="```python\n{code}")],
             "The area is $\\boxed{6}$.", correct=True, final_answer="6", meta={"type": "Geometry", "level": "Level 1"}),
        # 3: prose after the closing fence, before the output
        Spec("geo-2", "Perimeter of a 2 by 3 rectangle?", "10",
             [Turn("Compute:\n", Cell("print(2*(2+3))\n", "10\n"), fence="```python\n{code}```\nLet me run it.\n")],
             "$\\boxed{10}$", correct=True, final_answer="10", meta={"type": "Geometry", "level": "Level 2"}),
        # 4: interrupted while its second cell ran
        Spec("alg-3", "What is 2**10?", "1024", [Turn("Power.\n", Cell("print(2**10)\n", "1024\n"))],
             "Let me double check.\n", finish="interrupted", grade_status=None, interrupted_cell="import time\n"),
        # 5: a backend failure (schema 1.0: the error is a string)
        Spec("alg-4", "What is 3*3?", "9", [], "Three times", finish="error", grade_status=None,
             error="BackendError: the model server went away"),
        # 6: an answer the grader could not parse
        Spec("alg-5", "Simplify x/x.", "1", [Turn("", Cell("print('1 (x != 0)')\n", "1 (x != 0)\n"))],
             "$\\boxed{1 \\text{ unless } x = 0}$", correct=None, grade_status="unparsed",
             final_answer="1 \\text{ unless } x = 0"),
        # 7: hostile text everywhere the page shows it
        Spec(f"evil{HOSTILE}", f"Evil {HOSTILE}?", HOSTILE, [Turn(f"{HOSTILE}\n", Cell(f"print({HOSTILE!r})\n", HOSTILE + "\n"))],
             f"{HOSTILE} $\\boxed{{1}}$", correct=False, final_answer=HOSTILE),
    ]]


def as_11(t: Trajectory, **update: Any) -> Trajectory:
    """A copy of `t` as a 1.1 record with `update` applied (e.g. a structured error, prefix_lines)."""
    raw = t.model_dump()
    raw["schema_version"] = "1.1"
    raw.update(update)
    return Trajectory.model_validate(raw)
