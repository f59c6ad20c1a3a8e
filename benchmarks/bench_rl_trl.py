"""GRPO steps with TRL's own tool-calling path against tora's rollout_func, side by side in one run.

    python benchmarks/bench_rl_trl.py [--problems 4] [--generations 2] [--steps 2] [--max-completion 192]

The same model (Gemma 3 270M, the embedded model converted to safetensors,
float32 on the CPU), the same GSM8K problems, the same GRPO settings, twice:

- `trl-tools`: `GRPOTrainer(tools=[python])`, TRL's tool loop. The tool runs
  the code in a fresh Python process per call (stateless, as a TRL tool is).
  Gemma 3's chat template cannot render tool calls (TRL refuses it:
  `supports_tool_calling`), so the tokenizer gets the Qwen2.5 template TRL
  ships, for which TRL knows the response schema; prompts are conversational.
- `tora`: `GRPOTrainer(rollout_func=ToraRollout(...))`, tora's loop with its
  completion prompt (tora-gsm8k), a stateful sandboxed kernel per trajectory,
  the grader's verdict as reward.

Per path: wall time per step (generation, tools and the update), completion
tokens, tool calls, and of the tokens the loss skipped (`tool_mask` 0), the
fraction that was tool output: for tora the output blocks' ids recorded in the
trajectories (checked to be exactly the masked positions), for TRL the tokens
of the tool results it rendered (the rest is its chat template's scaffolding
around them). The machine's load average is printed: on a shared machine the
walls are noisy.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tora.backends.convert import convert, embedded_source
from tora.data import load_problems
from tora.engine import Limits
from tora.record import ExecutionStep, Problem


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def python(code: str) -> str:
    """Run Python code and return what it printed.

    Args:
        code: The Python program to run.

    Returns:
        The program's standard output and standard error.
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10, check=False)
    return (proc.stdout + proc.stderr)[-2000:]


class Recorder:
    """Wraps a trainer's loss to record, per step, the batch it trained on and the step's wall time."""

    def __init__(self, trainer: Any, rollout: Any) -> None:
        self.steps: list[dict[str, Any]] = []
        self.rollout = rollout
        self._loss = trainer._compute_loss
        trainer._compute_loss = self.loss
        self.t0 = time.monotonic()

    def loss(self, model: Any, inputs: dict[str, Any]) -> Any:
        mask = inputs["completion_mask"]
        tool_mask = inputs.get("tool_mask")
        skipped = 0 if tool_mask is None else int((mask * (1 - tool_mask)).sum())
        self.steps.append({"tokens": int(mask.sum()), "skipped": skipped, "t": time.monotonic(),
                           "trajectories": [g.trajectory for g in self.rollout.last] if self.rollout else []})
        return self._loss(model, inputs)


def trainer_for(kind: str, model_dir: Path, problems: list[Problem], args: Any, out: Path) -> tuple[Any, Any, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from tora.grading import grade
    from tora.grading.extract import extract_answer
    from tora.rl.trl import ToraRollout, tora_reward

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GRPOConfig(output_dir=str(out / kind), per_device_train_batch_size=len(problems) * args.generations,
                        num_generations=args.generations, max_steps=args.steps,
                        max_completion_length=args.max_completion, temperature=1.0, learning_rate=1e-5, beta=0.0,
                        seed=0, report_to=[], use_cpu=True, bf16=False, logging_steps=1, save_strategy="no",
                        disable_tqdm=True)
    if kind == "tora":
        rollout = ToraRollout(problems, template="tora-gsm8k", limits=Limits(max_tool_calls=3, timeout_s=10.0))
        trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=config,
                              train_dataset=Dataset.from_list(rollout.dataset_rows()), reward_funcs=tora_reward,
                              rollout_func=rollout)
        return trainer, rollout, None
    from importlib import resources

    answers = {p.text: p.answer for p in problems}
    tokenizer.chat_template = resources.files("trl").joinpath("chat_templates/qwen2_5.jinja").read_text()
    results: list[str] = []

    def recorded_python(code: str) -> str:
        """Run Python code and return what it printed.

        Args:
            code: The Python program to run.

        Returns:
            The program's standard output and standard error.
        """
        result = python(code)
        results.append(result)
        return result

    recorded_python.__name__ = "python"

    def correct(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        rewards = []
        for prompt, completion in zip(prompts, completions, strict=True):
            text = "".join(str(m.get("content") or "") for m in completion if m.get("role") == "assistant")
            found = extract_answer(text)
            ok = found.answer is not None and grade(found.answer, answers[prompt[-1]["content"]]).correct
            rewards.append(1.0 if ok else 0.0)
        return rewards

    rows = [{"prompt": [{"role": "user", "content": p.text}]} for p in problems]
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, args=config, train_dataset=Dataset.from_list(rows),
                          reward_funcs=correct, tools=[recorded_python])
    return trainer, None, results


def run(kind: str, model_dir: Path, problems: list[Problem], args: Any, out: Path) -> dict[str, Any]:
    trainer, rollout, tool_results = trainer_for(kind, model_dir, problems, args, out)
    recorder = Recorder(trainer, rollout)
    before = load()
    t0 = time.monotonic()
    try:
        trainer.train()
    finally:
        if rollout is not None:
            rollout.close()
    wall = time.monotonic() - t0
    skipped = sum(s["skipped"] for s in recorder.steps)
    if rollout is not None:
        trajectories = [t for s in recorder.steps for t in s["trajectories"]]
        tool_out = sum(len(s.observation_ids or []) for t in trajectories for s in t.steps
                       if isinstance(s, ExecutionStep))
        calls = sum(t.stats.tool_calls for t in trajectories)
        n = len(trajectories)
    else:
        tokenizer = trainer.processing_class
        tool_out = sum(len(tokenizer.encode(r, add_special_tokens=False)) for r in tool_results)
        calls = len(tool_results)
        n = args.steps * len(problems) * args.generations
    tokens = sum(s["tokens"] for s in recorder.steps)
    result = {"kind": kind, "wall_s": wall, "step_s": wall / args.steps, "tokens": tokens, "tool_calls": calls,
              "calls_per_trajectory": calls / n, "skipped": skipped,
              "tool_fraction": tool_out / skipped if skipped else float("nan"), "load": f"{before} -> {load()}"}
    del trainer
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--generations", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-completion", type=int, default=192)
    args = parser.parse_args()
    model_dir = convert(embedded_source())  # once, not timed
    problems = load_problems("gsm8k", limit=args.problems)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(kind, model_dir, problems, args, Path(tmp)) for kind in ("trl-tools", "tora")]
    print(f"{args.problems} problems x {args.generations} generations, {args.steps} GRPO steps, "
          f"max_completion_length {args.max_completion}, Gemma 3 270M float32 on CPU")
    print(f"{'path':<10} {'s/step':>8} {'tokens':>7} {'calls/traj':>10} {'skipped':>8} {'tool out/skipped':>16}  load")
    for r in results:
        print(f"{r['kind']:<10} {r['step_s']:>8.1f} {r['tokens']:>7} {r['calls_per_trajectory']:>10.2f} "
              f"{r['skipped']:>8} {r['tool_fraction']:>16.2f}  {r['load']}")
    trl, tora = results
    print(f"wall per step tora / trl-tools: {tora['step_s'] / trl['step_s']:.2f}x")


if __name__ == "__main__":
    main()
