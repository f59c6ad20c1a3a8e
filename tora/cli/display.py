"""Terminal rendering of engine events (rich), and the plain-text fallback.

Prose streams as it arrives; a ```python block is held back until its fence
closes and then shown once as a highlighted panel (re-rendering a growing
block is what makes rich Live flicker and corrupt scroll-back).
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.text import Text

from tora import fences
from tora.events import CodeBlockClosed, Event, ExecutionFinished, Finished, TextDelta, TurnStarted
from tora.record.schema import TextStep, Trajectory


def footer(t: Trajectory) -> str:
    """Counts, wall time, and the model's speed: what a bigger model costs shows here.

    A model call's time runs from the request to its last token, so it holds
    the prompt's evaluation too; tok/s is generated tokens over that time.
    """
    s = t.stats
    calls = [step for step in t.steps if isinstance(step, TextStep)]
    model_s = sum(max(0.0, step.t_end - step.t_start) for step in calls)
    line = f"{s.tool_calls} tool call(s), {s.completion_tokens} tokens, {s.wall_s:.1f}s"
    if calls and model_s > 0:
        line += (f" · {len(calls)} model call(s), {model_s / len(calls):.1f}s each, "
                 f"{s.completion_tokens / model_s:.1f} tok/s")
    return line


class PlainPrinter:
    """Writes the transcript exactly as the model saw it: text and ```output blocks."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.out: TextIO = stream or sys.stdout
        self._last = ""

    def __call__(self, event: Event) -> None:
        write = self.out.write
        if isinstance(event, TextDelta):
            write(event.text)
            self._last = event.text
        elif isinstance(event, ExecutionFinished):
            write(event.step.observation)
        elif isinstance(event, Finished):
            answer = event.trajectory.result.final_answer
            write(f"\nanswer: {answer if answer is not None else '(none)'}  [{event.trajectory.result.finish}]\n")
            write(f"{footer(event.trajectory)}\n")
        self.out.flush()


class RichPrinter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self._line = ""  # the current, unfinished line
        self._in_code = False
        self._printed_partial = 0  # chars of self._line already printed

    def __call__(self, event: Event) -> None:
        if isinstance(event, TurnStarted):
            self._line, self._printed_partial, self._in_code = "", 0, False
        elif isinstance(event, TextDelta):
            self._feed(event.text)
        elif isinstance(event, CodeBlockClosed):
            self._flush_line()
            self._in_code = False
            self.console.print(Panel(Syntax(event.code.rstrip("\n"), "python", theme="ansi_dark"),
                                     title=f"python #{event.index}", title_align="left", border_style="blue"))
        elif isinstance(event, ExecutionFinished):
            step = event.step
            bad = step.status != "ok"
            style = "red" if bad else "dim"
            title = f"output #{event.index}" + (f" · {step.status}" if bad else "") + f" · {step.duration_s:.2f}s"
            self.console.print(Panel(Text(step.rendered or "(no output)", style=style), title=title,
                                     title_align="left", border_style=style))
        elif isinstance(event, Finished):
            self._flush_line()
            self._summary(event.trajectory)

    def _feed(self, text: str) -> None:
        for piece in text.splitlines(keepends=True):
            self._line += piece
            if self._line.endswith("\n"):
                self._end_line(self._line)
                self._line, self._printed_partial = "", 0
            elif not self._in_code and not self._line.lstrip().startswith("`"):
                # Safe to show now: this line cannot become a fence.
                self.console.print(self._line[self._printed_partial:], end="", markup=False, highlight=False)
                self._printed_partial = len(self._line)

    def _end_line(self, line: str) -> None:
        bare = line.strip()
        if self._in_code:
            if bare.startswith("```"):
                self._in_code = False  # CodeBlockClosed renders the panel
            return
        if fences.opening_lang(bare) in fences.CODE_LANGS:
            self._in_code = True
            return
        self.console.print(line[self._printed_partial:], end="", markup=False, highlight=False)

    def _flush_line(self) -> None:
        if self._line and not self._in_code:
            self.console.print(self._line[self._printed_partial:], markup=False, highlight=False)
        elif self._printed_partial:
            self.console.print()
        self._line, self._printed_partial = "", 0

    def _summary(self, t: Trajectory) -> None:
        r = t.result
        if r.final_answer is not None and r.finish == "answered":
            self.console.print(Text.assemble(("Answer: ", "bold"), (r.final_answer, "bold green")))
        else:
            shown = f" (best guess: {r.final_answer}, by {r.extracted_by})" if r.final_answer else ""
            why = r.error or r.finish
            self.console.print(Text(f"No final answer: {why}{shown}", style="bold yellow"))
        self.console.print(Text(footer(t), style="dim"))

