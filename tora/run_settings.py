"""What a run folder's trajectories are made with, and the one rule for continuing it.

A batch run (eval, curate, correct) can be continued (`--resume`, or the
same command again). Continuing with another temperature, prompt, budget,
rendering or sandbox limit would silently mix two runs in one file, so every
setting that changes what a trajectory is (and, for curate and correct,
which are kept) is stored in the manifest as `RunSettings` and compared,
field by field, before anything is appended: the first difference is a usage
error (exit 2) naming the flag and both values. What only changes how fast a
run goes (concurrency, kernels, graders, engine, --limit) may differ.

A manifest written before `settings` existed is compared on what it holds
(`legacy_settings`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from sandbox import SandboxPolicy
from tora.engine import SolveConfig
from tora.errors import UsageError
from tora.prompts import PromptTemplate

# Fields whose flag is not "--" + the name with dashes.
_FLAGS = {"dataset": "the data set", "prompt_sha256": "--prompt (its text)", "render": "--render",
          "timeout_s": "--timeout", "cap": "--max-per-problem"}


class RunSettings(BaseModel):
    """Every setting that decides what a run's trajectories are; stored as the manifest's `settings`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    command: str
    model: str  # the spec (eval, curate) or the teacher's (correct)
    dataset: str | None = None
    prompt: str | None = None  # None: each record's own (correct continues with the parent's)
    prompt_sha256: str | None = None
    temperature: float
    top_p: float
    seed: int | None
    max_tool_calls: int
    max_tokens: int
    max_tokens_per_call: int
    timeout_s: float
    render: str | None = None  # None: as each parent recorded it (correct)
    run_on: str | None = None
    fresh_namespace: bool | None = None
    memory_mb: int
    verb: dict[str, Any] = {}  # the verb's own: grader, keep rule, caps, seeds of what is drawn

    @classmethod
    def of(cls, command: str, model: str, config: SolveConfig, policy: SandboxPolicy, *,
           template: PromptTemplate | None = None, dataset: str | None = None, render: bool = True,
           verb: dict[str, Any] | None = None) -> RunSettings:
        s, lim, r = config.sampling, config.limits, config.render
        return cls(command=command, model=model, dataset=dataset,
                   prompt=template.name if template else None, prompt_sha256=template.sha256 if template else None,
                   temperature=s.temperature, top_p=s.top_p, seed=s.seed, max_tool_calls=lim.max_tool_calls,
                   max_tokens=lim.max_tokens, max_tokens_per_call=lim.max_tokens_per_call, timeout_s=lim.timeout_s,
                   render=r.policy if render else None, run_on=r.run_on if render else None,
                   fresh_namespace=r.fresh_namespace if render else None, memory_mb=policy.memory_mb,
                   verb=verb or {})

    def stored(self) -> dict[str, Any]:
        """The manifest's form: one flat object, the verb's own settings beside the common ones."""
        flat = self.model_dump(exclude={"verb"})
        return {**flat, **self.verb}


def legacy_settings(manifest: dict[str, Any], verb_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """What a manifest from before `settings` says of them (`verb_keys`: the verb's own, stored at its top)."""
    found: dict[str, Any] = {k: manifest[k] for k in ("command", "model", *verb_keys) if k in manifest}
    data = manifest.get("dataset")
    if isinstance(data, dict) and "name" in data:
        found["dataset"] = data["name"]
    prompt = manifest.get("prompt")
    if isinstance(prompt, dict):
        found.update(prompt=prompt.get("name"), prompt_sha256=prompt.get("sha256"))
    config = manifest.get("config")
    if isinstance(config, dict):
        found.update(config.get("sampling") or {})
        found.update(config.get("limits") or {})
        render = config.get("render") or {}
        found.update({k: render[k] for k in ("run_on", "fresh_namespace") if k in render})
        if "policy" in render:
            found["render"] = render["policy"]
    return found


def stored_settings(manifest: dict[str, Any], verb_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    settings = manifest.get("settings")
    return settings if isinstance(settings, dict) else legacy_settings(manifest, verb_keys)


def flag(name: str) -> str:
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def check_resume(stored: dict[str, Any] | None, current: RunSettings, what: str, advice: str) -> None:
    """Refuse to continue a run whose stored settings differ from these: exit 2, naming the first
    setting that differs and both values ("RUN was run with --temperature 0.0, not 0.7; ADVICE")."""
    if stored is None:
        return
    if stored.get("command", current.command) != current.command:
        raise UsageError(f"{what} holds a `tora {stored['command']}` run, not a `tora {current.command}` one")
    for name, value in current.stored().items():
        if name in stored and stored[name] != value:
            shown = "--teacher" if name == "model" and current.command == "correct" else flag(name)
            raise UsageError(f"resume: {what} was run with {shown} {_show(stored[name])}, "
                             f"not {_show(value)}; {advice}")


def _show(value: Any) -> str:
    return "(none)" if value is None else str(value)
