"""Flags shared by the verbs that run the loop (solve, eval, curate)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from sandbox import SandboxPolicy
from tora.engine import Limits, RenderSettings, SamplingParams, SolveConfig
from tora.kernels import sandbox_policy
from tora.render import RENDERERS
from tora.scheduler import Capacity

F = TypeVar("F", bound=Callable[..., Any])


def loop_options(func: F) -> F:
    """--model, --prompt and the budgets; each flag also reads TORA_<NAME>."""
    opts = [
        click.option("--model", "-m", "model", envvar="TORA_MODEL", default="embedded", show_default=True,
                     help="Model spec: embedded | gguf:FILE | hf:DIR | vllm:DIR | vllm:embedded | replay:FILE."),
        click.option("--prompt", "-p", "prompt", envvar="TORA_PROMPT", default=None,
                     help="Prompt template name (see prompts/) or file [default: tora-gsm8k; tora-math for MATH sets]."),
        click.option("--max-tool-calls", type=click.IntRange(0), default=4, show_default=True),
        click.option("--max-tokens", type=click.IntRange(1), default=2048, show_default=True,
                     help="Completion token budget for the whole trajectory."),
        click.option("--max-tokens-per-call", type=click.IntRange(1), default=1024, show_default=True),
        click.option("--temperature", "-t", type=click.FloatRange(0.0), default=0.0, show_default=True),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=10.0, show_default=True,
                     help="Wall-time limit per code cell, seconds."),
        click.option("--render", "render_policy", type=click.Choice(sorted(RENDERERS)), default="default",
                     show_default=True, help="How execution results are shown to the model."),
        click.option("--run-on", "run_on", type=click.Choice(["close", "output"]), default="close", show_default=True,
                     help="Run a python block when the model closes it, or only when it writes ```output (ToRA)."),
        click.option("--fresh-namespace", is_flag=True,
                     help="Run each code block alone in a fresh kernel (what ToRA-trained models expect)."),
        click.option("--isolation", type=click.Choice(["auto", "bwrap", "landlock", "none"]), default=None,
                     envvar="TORA_ISOLATION", help="Sandbox tier [default: auto, the strongest available]."),
        click.option("--memory-mb", type=click.IntRange(64), default=None, envvar="TORA_MEMORY_MB",
                     help="Memory limit per kernel [default: 2048]. Other limits: TORA_SANDBOX_<FIELD>."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def config_from(kw: dict[str, Any]) -> SolveConfig:
    return SolveConfig(
        sampling=SamplingParams(temperature=kw["temperature"], top_p=kw["top_p"], seed=kw["seed"]),
        limits=Limits(
            max_tool_calls=kw["max_tool_calls"],
            max_tokens=kw["max_tokens"],
            max_tokens_per_call=kw["max_tokens_per_call"],
            timeout_s=kw["timeout_s"],
        ),
        render=RenderSettings(policy=kw["render_policy"], run_on=kw["run_on"], fresh_namespace=kw["fresh_namespace"]),
    )


def sandbox_from(kw: dict[str, Any]) -> SandboxPolicy:
    """The kernels' limits: --timeout, --isolation, --memory-mb, then TORA_SANDBOX_*."""
    return sandbox_policy(timeout_s=kw["timeout_s"], isolation=kw.get("isolation"), memory_mb=kw.get("memory_mb"))


def scheduler_options(func: F) -> F:
    """The batch verbs' three limits, sized independently."""
    opts = [
        click.option("--concurrency", "-c", type=click.IntRange(1), default=4, show_default=True,
                     help="Trajectories in flight at once."),
        click.option("--kernels", type=click.IntRange(1), default=None,
                     help="Live kernels at once [default: as --concurrency]; a trajectory holds one from its first "
                          "code block to its end."),
        click.option("--graders", type=click.IntRange(1), default=2, show_default=True,
                     help="Grading worker processes."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def capacity_from(kw: dict[str, Any]) -> Capacity:
    return Capacity(in_flight=kw["concurrency"], kernels=kw["kernels"] or kw["concurrency"], graders=kw["graders"])
