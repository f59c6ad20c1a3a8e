"""Flags shared by the verbs that run the loop (solve, eval, curate)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from tora.errors import UsageError
from tora.loop import LoopSettings
from tora.render import RENDERERS

if TYPE_CHECKING:
    from tora.distributed.driver import ClusterOptions

F = TypeVar("F", bound=Callable[..., Any])


# Every backend kind's spec (see `tora models`); --model and correct's --teacher take the same.
MODEL_SPECS = ("embedded | gguf:FILE | hf:DIR | vllm:DIR | vllm:embedded | replay:FILE | "
               "openai:MODEL@URL[?OPTIONS]")

_MODEL = [
    click.option("--model", "-m", "model", envvar="TORA_MODEL", default="embedded", show_default=True,
                 help=f"Model spec: {MODEL_SPECS}."),
    click.option("--prompt", "-p", "prompt", envvar="TORA_PROMPT", default=None,
                 help="Prompt template name (see prompts/) or file [default: tora-gsm8k; tora-math for MATH sets]."),
]
_BUDGETS = [
    click.option("--max-tool-calls", type=click.IntRange(0), default=4, show_default=True),
    click.option("--max-tokens", type=click.IntRange(1), default=2048, show_default=True,
                 help="Completion token budget for the whole trajectory."),
    click.option("--max-tokens-per-call", type=click.IntRange(1), default=1024, show_default=True),
]
_SAMPLING = [
    click.option("--temperature", "-t", type=click.FloatRange(0.0), default=0.0, show_default=True),
    click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=1.0, show_default=True),
    click.option("--seed", type=int, default=None),
]
_TIMEOUT = click.option("--timeout", "timeout_s", type=click.FloatRange(0.1), default=10.0, show_default=True,
                        help="Wall-time limit per code cell, seconds.")
_RENDER = [
    click.option("--render", "render_policy", type=click.Choice(sorted(RENDERERS)), default="default",
                 show_default=True, help="How execution results are shown to the model."),
    click.option("--run-on", "run_on", type=click.Choice(["close", "output"]), default="close", show_default=True,
                 help="Run a python block when the model closes it, or only when it writes ```output (ToRA)."),
    click.option("--fresh-namespace", is_flag=True,
                 help="Run each code block alone in a fresh kernel (what ToRA-trained models expect)."),
]
_SANDBOX = [
    click.option("--isolation", type=click.Choice(["auto", "bwrap", "landlock", "none"]), default=None,
                 envvar="TORA_ISOLATION", help="Sandbox tier [default: auto, the strongest available]."),
    click.option("--memory-mb", type=click.IntRange(64), default=None, envvar="TORA_MEMORY_MB",
                 help="Memory limit per kernel [default: 2048]. Other limits: TORA_SANDBOX_<FIELD>."),
]


def _apply(opts: list[Callable[[F], F]], func: F) -> F:
    for opt in reversed(opts):
        func = opt(func)
    return func


def loop_options(func: F) -> F:
    """--model, --prompt and the budgets; each flag also reads TORA_<NAME>."""
    return _apply([*_MODEL, *_BUDGETS, *_SAMPLING, _TIMEOUT, *_RENDER, *_SANDBOX], func)


def continuation_options(func: F) -> F:
    """The budgets, sampling and sandbox flags of a verb that continues recorded trajectories
    (`tora correct`): the model is its own flag, and the rendering is the recorded one."""
    return _apply([*_BUDGETS, *_SAMPLING, _TIMEOUT, *_SANDBOX], func)


def sandbox_options(func: F) -> F:
    """The kernels' limits alone (`tora sandbox serve`): --timeout, --isolation, --memory-mb."""
    return _apply([_TIMEOUT, *_SANDBOX], func)


# The options LoopSettings is built from; a verb without one of the flags gets its default.
_LOOP_FIELDS = ("temperature", "top_p", "seed", "max_tool_calls", "max_tokens", "max_tokens_per_call", "timeout_s",
                "render_policy", "run_on", "fresh_namespace", "isolation", "memory_mb", "concurrency", "kernels",
                "graders")


def loop_settings(kw: dict[str, Any]) -> LoopSettings:
    """The loop's settings from a verb's options, built once (see `tora.loop.LoopSettings`)."""
    return LoopSettings.build(**{name: kw[name] for name in _LOOP_FIELDS if name in kw})


def scheduler_options(func: F) -> F:
    """The batch verbs' three limits, sized independently."""
    return _apply([
        click.option("--concurrency", "-c", type=click.IntRange(1), default=4, show_default=True,
                     help="Trajectories in flight at once."),
        click.option("--kernels", type=click.IntRange(1), default=None,
                     help="Live kernels at once [default: as --concurrency]; a trajectory holds one from its first "
                          "code block to its end."),
        click.option("--graders", type=click.IntRange(1), default=2, show_default=True,
                     help="Grading worker processes."),
    ], func)


def engine_options(func: F) -> F:
    """Where the batch verbs run: this process, or workers on a Ray cluster (sized apart from each worker's limits)."""
    opts = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     envvar="TORA_ENGINE",
                     help="local: this process. ray: problems sharded across Ray workers, each with its own "
                          "scheduler, kernel pool and model client; --concurrency, --kernels and --graders are "
                          "then per worker."),
        click.option("--address", default=None, envvar="RAY_ADDRESS",
                     help="Ray cluster to join (host:port, or auto) [default: a private cluster on this machine, "
                          "loopback only]. The run folder must be on a filesystem every node sees."),
        click.option("--actors", type=click.IntRange(1), default=None,
                     help="Ray workers [default: one per node]."),
        click.option("--actor-cpus", type=click.FloatRange(0.0), default=1.0, show_default=True,
                     help="CPUs each Ray worker reserves (its kernels and event loop run on them)."),
        click.option("--actor-gpus", type=click.FloatRange(0.0), default=0.0, show_default=True,
                     help="GPUs each Ray worker reserves (for a model loaded in the worker)."),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def cluster_from(kw: dict[str, Any]) -> ClusterOptions | None:
    """The cluster sizing of `--engine ray`; None for the local engine."""
    from tora.distributed.driver import ClusterOptions

    if kw["engine"] != "ray":
        given = [flag for flag, name, default in (("--actors", "actors", None), ("--actor-cpus", "actor_cpus", 1.0),
                                                  ("--actor-gpus", "actor_gpus", 0.0)) if kw[name] != default]
        if given:
            raise UsageError(f"{', '.join(given)} need --engine ray")
        return None
    return ClusterOptions(address=kw["address"] or None, workers=kw["actors"], worker_cpus=kw["actor_cpus"],
                          worker_gpus=kw["actor_gpus"])
