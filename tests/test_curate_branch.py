"""`tora curate --branch-after-cell N`: a problem's K samples share the prefix one of them generated
up to its N-th cell's output, and continue in forks of its kernel (tora.branching); real pool
kernels, replayed models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_released
from test_correct import records, run
from test_tokens import NATALIA
from token_checks import check_token_invariant

from tora.backends.registry import load_backend
from tora.branching import Branches
from tora.engine import Episode, Limits, SolveConfig
from tora.events import Finished
from tora.kernels import KernelPool, SandboxPolicy
from tora.prefix_kernels import PrefixKernels
from tora.prompts import load_prompt
from tora.record import Problem, Trajectory
from tora.scheduler import Job, LiveKernels

# The leader draws x and shows it; each follower's recording is its continuation: it shows the x
# its kernel holds. With a fork that is the leader's x, the one the shared prefix shows.
LEADER = ("Draw.\n```python\nimport random\nx = random.random()\nprint(round(x, 12))\n```\n```output\n0.5\n```\n"
          "Answer.\n```python\nprint(12)\n```\n```output\n12\n```\nSo $\\boxed{12}$.")
# The same leaving a thread running: no snapshot, so the fork re-runs the cell (and draws anew).
THREADED = LEADER.replace("import random\n", "import random, threading, time\n"
                          "threading.Thread(target=time.sleep, args=(30,), name='sleeper', daemon=True).start()\n")
FOLLOWER = "Check x.\n```python\nprint(round(x, 12))\n```\n```output\n0.5\n```\nSo $\\boxed{12}$."
OTHER = FOLLOWER.replace("Check x.", "Check x once more.")  # not a duplicate of the other follower
# A leader that answers before any cell: nothing to share, its followers run whole.
NO_CELL = "It is $\\boxed{12}$."


def curate(tmp_path: Path, leader: str) -> tuple[Path, list[str]]:
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": p, "question": f"What is {p}?", "answer": "12"}) + "\n" for p in "pq"))
    samples = write_released(tmp_path / "samples.jsonl", [
        {"idx": "p", "question": "What is p?", "code": [leader, FOLLOWER, OTHER]},
        {"idx": "q", "question": "What is q?", "code": [NO_CELL, FOLLOWER, OTHER]}])
    out = tmp_path / "run"
    args = ["curate", str(data), "--model", f"replay:{samples}", "--samples", "3", "--branch-after-cell", "1",
            "--out", str(out)]
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    return out, args


def by_sample(out: Path, problem: str) -> dict[int, dict[str, Any]]:
    latest = {r["sample_index"]: r for r in records(out / "trajectories.jsonl") if r["problem"]["id"] == problem}
    assert sorted(latest) == [0, 1, 2]
    return latest


def first_output(record: dict[str, Any]) -> str:
    return str(record["steps"][2]["stdout"])


def shown_x(record: dict[str, Any]) -> str:
    return str(record["steps"][-2]["stdout"])


def test_samples_share_the_leaders_prefix_and_continue_in_forks_of_its_kernel(tmp_path: Path) -> None:
    out, args = curate(tmp_path, LEADER)
    p = by_sample(out, "p")
    leader = p[0]
    assert leader["shared_prefix"] == {"sample_index": 0, "steps": 3} and leader["kernel_state"] is None
    for k in (1, 2):
        r = p[k]
        assert r["shared_prefix"] == {"sample_index": 0, "steps": 3}
        assert r["steps"][:3] == leader["steps"][:3]  # verbatim: text, code, output
        assert r["parent"] is None and r["prefix_lines"] is None and r["sample_index"] == k
        state = r["kernel_state"]
        assert state["method"] == "fork" and state["cells"] == 1 and state["diverged"] == [], state
        # The follower's kernel holds the leader's x: the value the shared prefix shows.
        assert shown_x(r) == first_output(leader) and shown_x(r) != "0.5\n"
        assert r["result"]["correct"] is True and r["stats"]["tool_calls"] == 2  # the shared cell counts
    for r in by_sample(out, "q").values():  # the leader ran no cell: nothing shared
        assert r["shared_prefix"] is None and r["kernel_state"] is None
    kept = [r["id"] for r in records(out / "curated.jsonl")]
    assert len(kept) == len(set(kept)) == 4  # p's three and q's leader

    # Interrupted before the followers were recorded: they continue from the recorded prefix,
    # its cell re-run once (another x: named as diverged), and nothing is doubled.
    lines = (out / "trajectories.jsonl").read_text().splitlines(keepends=True)
    kept_lines = [line for line in lines if json.loads(line)["problem"]["id"] != "p" or
                  json.loads(line)["sample_index"] == 0]
    (out / "trajectories.jsonl").write_text("".join(kept_lines))
    (out / "curated.jsonl").write_text("".join(line for line in (out / "curated.jsonl").read_text().splitlines(True)
                                               if json.loads(line)["problem"]["id"] != "p"))
    proc = run(args)
    assert proc.returncode == 0, proc.stderr
    assert len(records(out / "trajectories.jsonl")) == len(kept_lines) + 2
    again = by_sample(out, "p")
    assert again[0] == leader
    states = sorted((again[k]["kernel_state"]["method"], again[k]["kernel_state"]["diverged"]) for k in (1, 2))
    assert states == [("fork", [0]), ("replay", [0])]  # one re-run kernel, forked once, then handed over
    for k in (1, 2):
        assert again[k]["steps"][:3] == leader["steps"][:3] and again[k]["shared_prefix"]["steps"] == 3
    assert shown_x(again[1]) == shown_x(again[2]) != first_output(leader)
    kept = [r["id"] for r in records(out / "curated.jsonl")]
    assert len(kept) == len(set(kept)) == 4
    # Once more: nothing left to run, nothing added.
    before = (out / "trajectories.jsonl").read_bytes(), (out / "curated.jsonl").read_bytes()
    assert run(args).returncode == 0
    assert ((out / "trajectories.jsonl").read_bytes(), (out / "curated.jsonl").read_bytes()) == before
    # The flag decides what is sampled: a run cannot change it on resume, nor shard it over Ray.
    other = run([a for a in args if a not in ("--branch-after-cell", "1")] + ["--branch-after-cell", "2"])
    assert other.returncode == 2 and "--branch-after-cell 1, not 2" in other.stderr, other.stderr
    ray = run([*args[:-2], "--out", str(tmp_path / "ray"), "--engine", "ray"])
    assert ray.returncode == 2 and "--branch-after-cell" in ray.stderr and len(ray.stderr.strip().splitlines()) == 1


def test_a_prefix_that_left_a_thread_running_is_replayed_per_follower_with_the_reason(tmp_path: Path) -> None:
    out, _ = curate(tmp_path, THREADED)
    p = by_sample(out, "p")
    for k in (1, 2):
        state = p[k]["kernel_state"]
        assert state["method"] == "replay" and "sleeper" in state["reason"] and state["diverged"] == [0], state
        assert p[k]["steps"][:3] == p[0]["steps"][:3]
        assert shown_x(p[k]) != first_output(p[0])  # what the record warns of


@pytest.mark.model
async def test_on_the_token_path_a_sample_goes_on_from_the_shared_prefixs_exact_ids() -> None:
    backend = load_backend("embedded-tiny")
    problem = Problem(id="natalia", text=NATALIA)
    config = SolveConfig(limits=Limits(max_tool_calls=2, max_tokens=400, timeout_s=10))
    async with KernelPool(SandboxPolicy(timeout_s=10), size=2) as pool:
        stems = PrefixKernels(pool)
        branches = Branches(1, stems)
        kernels = LiveKernels(pool, 4)

        async def solve(job: Job) -> Trajectory:
            episode = Episode(job.problem, backend=backend, template=load_prompt("tora-gsm8k"), kernels=kernels,
                              config=job.config, sample_index=job.sample_index, prefix=job.prefix,
                              prefix_states=stems, brancher=branches)
            events = [e async for e in episode.run()]
            assert isinstance(events[-1], Finished)
            return events[-1].trajectory

        assert branches.plan(problem.id, [0, 1], [], 10) == {0: None, 1: None}
        leader = await solve(Job(problem, 0, config))
        assert leader.shared_prefix is not None, leader.completion()  # the model ran a cell
        follower = await solve(await branches.follow(Job(problem, 1, config)))
        await stems.aclose()
    n = leader.shared_prefix.steps
    assert follower.shared_prefix == leader.shared_prefix and follower.steps[:n] == leader.steps[:n]
    assert follower.kernel_state is not None and follower.kernel_state.method == "fork"
    # The follower was fed the leader's prompt ids and the prefix's ids, then its own: exactly what
    # llama.cpp evaluated for it.
    assert follower.prompt_ids == leader.prompt_ids
    check_token_invariant(follower, backend)
