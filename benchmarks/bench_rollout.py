"""Rollouts for RL: rollouts/s, and what recording exact tokens costs against the text path.

    .venv/bin/python benchmarks/bench_rollout.py [--problems N] [--rounds R] [--max-tokens M] [--threads T]

(`--threads 1` on a machine shared with other jobs: llama.cpp's threads wait
on each other at every step, which oversubscribed cores turn into seconds.)

Side by side in one run, alternating the order each round:

- embedded: the embedded model through llama.cpp, greedy, on the first N GSM8K
  problems with real sandboxed kernels (a warm pool). *tokens*: the token path
  (ids fed and recorded, logprobs computed per token, output blocks tokenised);
  *text*: the same episodes with `record_tokens=False` (the text path, no
  logprobs: what tora did before). Greedy decoding writes the same tokens on
  both paths, so the wall times compare like for like (the script checks that
  the completions match and says so if they do not). Also the cost of one
  logprob computation against one decode step, which no machine load blurs.
- replay: the embedded model's token-path records played back, each
  `--replay-repeat` times (the replay
  backend has no tokens, so both paths are the text path: the overhead there
  is that of the loop's bookkeeping alone), with 4 trajectories in flight.

Goal: the token path costs <= 3 % of wall time.

Then the TRL half (issue 16 section 5): `bench_rl_trl.py` in its own process,
TRL's tool-calling GRPO path against tora's rollout_func on the same prompts
and model (wall time per step, the fraction of masked tokens that were tool
output).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tora.backends.base import Backend
from tora.backends.embedded import embedded_model_path
from tora.backends.llamacpp import LlamaCppBackend
from tora.backends.replay import ReplayBackend
from tora.data import load_problems
from tora.engine import Episode, Limits, SolveConfig
from tora.events import Finished
from tora.kernels import KernelPool, SandboxPolicy
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory, TrajectoryWriter

TEMPLATE = load_prompt("tora-gsm8k")


@dataclass
class Side:
    walls: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    records: list[Trajectory] = field(default_factory=list)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    def per_token_ms(self) -> float:
        return statistics.median(w / max(n, 1) for w, n in zip(self.walls, self.tokens, strict=True)) * 1000


async def rollouts(backend: Backend, problems: list[Problem], pool: KernelPool, config: SolveConfig, *,
                   record_tokens: bool, in_flight: int) -> tuple[float, list[Trajectory]]:
    gate = asyncio.Semaphore(in_flight)

    async def one(problem: Problem) -> Trajectory:
        async with gate:
            episode = Episode(problem, backend=backend, template=TEMPLATE, kernels=pool, config=config,
                              record_tokens=record_tokens)
            async for event in episode.run():
                if isinstance(event, Finished):
                    return event.trajectory
        raise AssertionError("an episode ended without its trajectory")

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(p) for p in problems))
    return time.perf_counter() - t0, list(done)


async def compare(backend: Backend, problems: list[Problem], config: SolveConfig, rounds: int,
                  in_flight: int) -> dict[str, Side]:
    sides = {"text": Side(), "tokens": Side()}
    async with KernelPool(SandboxPolicy(timeout_s=10), size=max(2, in_flight)) as pool:
        await rollouts(backend, problems[:1], pool, config, record_tokens=True, in_flight=1)  # warm-up
        for r in range(rounds):
            order = ("text", "tokens") if r % 2 == 0 else ("tokens", "text")
            for name in order:
                wall, records = await rollouts(backend, problems, pool, config,
                                               record_tokens=name == "tokens", in_flight=in_flight)
                side = sides[name]
                side.walls.append(wall)
                side.tokens.append(sum(t.stats.completion_tokens for t in records))
                side.records = records
    return sides


def logprob_cost(backend: Any, steps: int = 300) -> tuple[float, float]:
    """ms per logprob computation (llama.cpp's vocabulary-sized softmax) and ms per decode step."""
    import numpy as np

    logits = np.random.default_rng(0).standard_normal(backend._n_vocab).astype(np.float32)
    t0 = time.perf_counter()
    for i in range(steps):
        backend._logprob(logits, i, 1.0, 0)
    lp_ms = (time.perf_counter() - t0) / steps * 1000
    llm = backend._llm
    llm.reset()
    llm.eval(backend.encode_prompt("Count: 1, 2, 3,"))
    t0 = time.perf_counter()
    for _ in range(32):
        llm.eval([llm.token_bos() + 300])
    step_ms = (time.perf_counter() - t0) / 32 * 1000
    llm.reset()
    return lp_ms, step_ms


def report(label: str, sides: dict[str, Side], n: int) -> None:
    text, tokens = sides["text"], sides["tokens"]
    same = [a.completion() == b.completion() for a, b in zip(text.records, tokens.records, strict=True)]
    print(f"\n{label}: {n} rollouts x {len(text.walls)} rounds per path (medians)")
    print(f"  {'path':<8} {'wall s':>8} {'rollouts/s':>11} {'ms/token':>9}   every round's wall s")
    for name, side in sides.items():
        rounds = " ".join(f"{w:.2f}" for w in side.walls)
        print(f"  {name:<8} {side.wall:8.2f} {n / side.wall:11.2f} {side.per_token_ms():9.2f}   {rounds}")
    pairs = [b / a - 1 for a, b in zip(text.walls, tokens.walls, strict=True)]
    print("  per round, tokens against text: " + " ".join(f"{d:+.1%}" for d in pairs))
    overhead = tokens.wall / text.wall - 1
    print(f"  token recording overhead: {overhead:+.1%} of wall time (goal <= +3%); per token "
          f"{tokens.per_token_ms() / text.per_token_ms() - 1:+.1%}; "
          f"identical completions: {sum(same)}/{len(same)}")


def trl_comparison(args: argparse.Namespace) -> None:
    """TRL's tool-calling GRPO path against tora's rollout_func on the same prompts and model:
    wall time per step and the fraction of masked tokens that were tool output. It is
    `bench_rl_trl.py`, run in a process of its own (torch and llama.cpp do not share one)."""
    import subprocess

    script = Path(__file__).with_name("bench_rl_trl.py")
    print("\nTRL's tool-calling GRPO vs tora's rollout_func (benchmarks/bench_rl_trl.py):", flush=True)
    proc = subprocess.run([sys.executable, str(script), "--problems", str(args.problems)], check=False)
    if proc.returncode != 0:
        print(f"  bench_rl_trl.py failed (exit {proc.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--replay-repeat", type=int, default=16, help="replay: play each record this many times")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: every core)")
    args = parser.parse_args()
    problems = load_problems("gsm8k", limit=args.problems)
    config = SolveConfig(limits=Limits(max_tool_calls=2, max_tokens=args.max_tokens, timeout_s=10))
    backend = LlamaCppBackend(embedded_model_path(), n_threads=args.threads)
    lp_ms, step_ms = logprob_cost(backend)
    print(f"llama.cpp: one logprob (softmax over {backend._n_vocab} logits) {lp_ms:.3f} ms; "
          f"one decode step {step_ms:.2f} ms: {lp_ms / step_ms:.1%} of decoding")
    backend.prepare(TEMPLATE.prefix)  # as tora eval does: the few-shot prefix's KV state cached
    model = asyncio.run(compare(backend, problems, config, args.rounds, in_flight=1))
    report("embedded (llama.cpp)", model, len(problems))
    with tempfile.TemporaryDirectory() as tmp:
        recorded = Path(tmp) / "recorded.jsonl"
        with TrajectoryWriter(recorded) as writer:
            for t in model["tokens"].records:
                writer.append_sync(t)
        replayed = problems * args.replay_repeat
        replay = asyncio.run(compare(ReplayBackend(recorded), replayed, config, args.rounds, in_flight=4))
    report("replay", replay, len(replayed))
    trl_comparison(args)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
