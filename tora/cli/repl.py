"""The interactive loop behind `tora solve` with no problem.

A session owns one kernel, so variables defined while solving one question
are still there for the next (`/new` starts a fresh kernel). Each question is
its own trajectory, recorded with origin "interactive". Ctrl-C while the
model writes or a cell runs stops that exchange (the cell is interrupted,
the kernel and session are kept); Ctrl-C or Ctrl-D at an empty prompt exits.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from sandbox import SandboxPolicy
from tora.backends.base import Backend
from tora.backends.registry import load_backend
from tora.cli.display import PlainPrinter, RichPrinter
from tora.cli.interactive import run_episode
from tora.data import problem_from_text
from tora.engine import Episode, SolveConfig
from tora.errors import ToraError
from tora.kernels import FreshKernels
from tora.paths import history_file
from tora.prompts import PromptTemplate, default_prompt, load_prompt
from tora.record import TrajectoryWriter

HELP = """\
Type a math problem and press Enter (Esc then Enter, or a trailing \\, for a new line).
  /help            this help
  /model SPEC      switch model (embedded, gguf:FILE, hf:DIR, replay:FILE)
  /prompt NAME     switch prompt template
  /new             fresh kernel: forget all variables
  /quit            leave (also Ctrl-D)
Ctrl-C stops the current answer but keeps the session."""


class Session:
    def __init__(self, spec: str, prompt: str | None, config: SolveConfig, policy: SandboxPolicy, record: Path | None,
                 console: Console) -> None:
        self.spec = spec
        self.config = config
        self.console = console
        self.template: PromptTemplate = load_prompt(prompt or default_prompt(spec))
        self.prompt_chosen = prompt is not None  # else /model also switches to the new model's own prompt
        self.backend: Backend = load_backend(spec)
        self.backend.prepare(self.template.prefix)
        self.kernels = FreshKernels(policy)
        self.kernel: Any = None
        self.writer = TrajectoryWriter(record) if record else None
        self.parent: str | None = None

    async def ask(self, question: str) -> None:
        if self.kernel is None:
            self.kernel = await self.kernels.acquire()
        episode = Episode(
            problem_from_text(question), backend=self.backend, template=self.template, kernels=self.kernels,
            config=self.config, spec=self.spec, origin="interactive", kernel=self.kernel,
        )
        printer = RichPrinter(self.console) if self.console.is_terminal else PlainPrinter()
        task = asyncio.ensure_future(run_episode(episode, [printer], self.writer))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            self.console.print("[yellow]interrupted; the session and its variables are kept[/yellow]")
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    async def command(self, line: str) -> bool:
        """Handle a slash command; False means quit."""
        name, _, arg = line[1:].partition(" ")
        arg = arg.strip()
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.console.print(HELP, markup=False)
        elif name == "new":
            await self.close_kernel()
            self.console.print("fresh kernel")
        elif name == "model" and arg:
            backend = load_backend(arg)
            await self.backend.aclose()
            self.backend, self.spec = backend, arg
            if not self.prompt_chosen:
                self.template = load_prompt(default_prompt(arg))
            self.backend.prepare(self.template.prefix)
            self.console.print(f"model: {self.backend.model} ({self.backend.name})")
        elif name == "model":
            self.console.print(f"model: {self.backend.model} ({self.backend.name}, spec {self.spec})")
        elif name == "prompt" and arg:
            self.template = load_prompt(arg)
            self.prompt_chosen = True
            self.backend.prepare(self.template.prefix)
            self.console.print(f"prompt: {self.template.name}")
        else:
            self.console.print(f"unknown command /{name}; /help lists them")
        return True

    def status(self) -> str:
        kernel = "kernel live" if self.kernel is not None else "no kernel yet"
        return f"{self.backend.model} · prompt {self.template.name} · {kernel}"

    async def close_kernel(self) -> None:
        if self.kernel is not None:
            await self.kernels.release(self.kernel)
            self.kernel = None

    async def close(self) -> None:
        await self.close_kernel()
        await self.backend.aclose()
        if self.writer is not None:
            self.writer.close()


async def _lines_tty(toolbar: Any) -> Any:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    path = history_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    session: PromptSession[str] = PromptSession(
        history=FileHistory(str(path)), key_bindings=bindings,
        bottom_toolbar=lambda: f" {toolbar()} · Esc Enter: new line · /help",
    )
    while True:
        try:
            text = await session.prompt_async("tora> ")
        except KeyboardInterrupt:
            return
        except EOFError:
            return
        while text.endswith("\\"):
            text = text[:-1] + "\n" + await session.prompt_async("  ... ")
        yield text


async def _lines_pipe() -> Any:
    # Not a terminal (scripts, tests): one problem or command per line.
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            return
        yield line.rstrip("\n")


async def _repl(spec: str, prompt: str | None, config: SolveConfig, policy: SandboxPolicy, record: Path | None) -> int:
    console = Console()
    tty = sys.stdin.isatty() and console.is_terminal
    session = Session(spec, prompt, config, policy, record, console)
    if tty:
        console.print(f"tora · {session.backend.model} · prompt {session.template.name} · /help for commands")
    try:
        async for raw in _lines_tty(session.status) if tty else _lines_pipe():
            line = raw.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not await session.command(line):
                        break
                else:
                    await session.ask(line)
            except ToraError as exc:
                console.print(f"[red]error:[/red] {exc}")
    finally:
        await session.close()
    return 0


def run_repl(spec: str, prompt: str | None, config: SolveConfig, policy: SandboxPolicy, record: Path | None) -> int:
    return asyncio.run(_repl(spec, prompt, config, policy, record))
