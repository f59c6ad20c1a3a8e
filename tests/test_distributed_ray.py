"""`tora eval --engine ray` on a real Ray cluster, on loopback, started and stopped here.

One cluster for the module (Ray in this process, its daemons our children),
joined by `tora eval` run as a user runs it (`--address`). Replayed models
through real kernels; a worker killed mid-run from outside (`ray.kill`); the
driver killed with SIGKILL and the run resumed; the embedded model in a
worker. Every Ray listener of this process tree is checked to be on
127.0.0.1 while the runs go on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TORA, write_released

from tora.distributed.cluster import LOOPBACK_ENV

os.environ.update(LOOPBACK_ENV)  # before Ray is imported: its daemons bind 127.0.0.1 only
ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from tora.distributed.driver import actor_prefix  # noqa: E402
from tora.distributed.leases import open_leases, read_leases  # noqa: E402

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def says(n: int, sleep: float = 0.0) -> str:
    code = f"import time\ntime.sleep({sleep})\nprint({n})" if sleep else f"print({n})"
    return f"Let me compute.\n```python\n{code}\n```\n```output\n{n}\n```\nSo the answer is $\\boxed{{{n}}}$."


def fixture(tmp_path: Path, problems: int, samples: int, sleep: float = 0.0, stagger: float = 0.0) -> tuple[Path, Path]:
    """Problem i's answer is i; sample k answers i + k % 2 (every other sample is wrong).

    Sample k's cell sleeps ``sleep + k * stagger``: with a stagger, the samples of one problem end apart.
    """
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i}?", "answer": str(i)}) + "\n"
                            for i in range(problems)))
    released = write_released(tmp_path / "samples.jsonl", [
        {"idx": f"p{i}", "question": f"What is {i}?", "code": [says(i + k % 2, sleep + k * stagger) for k in range(samples)]}
        for i in range(problems)])
    return data, released


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def signature(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """What a run produced, less what differs between any two runs (ids, times, run ids)."""
    def completion(r: dict[str, Any]) -> str:
        return "".join(s.get("content", "") if s["type"] == "text" else s.get("observation", "")
                       for s in r["steps"] if s["type"] != "code")
    return sorted((r["problem"]["id"], r["sample_index"], completion(r), r["result"]["final_answer"],
                   r["result"]["finish"], r["result"]["correct"]) for r in rows)


def shard_units(out: Path) -> Counter[tuple[str, int]]:
    """How many times each unit of work was recorded, over every worker's shard."""
    return Counter((r["problem"]["id"], r["sample_index"]) for shard in sorted((out / "shards").glob("*.jsonl"))
                   if not shard.name.endswith(".curated.jsonl") for r in records(shard))


class ListenerWatch:
    """Every TCP listener of this process and its descendants (Ray's daemons and workers, the CLI),
    sampled while a run goes on."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int, str]] = set()
        self.pids: dict[int, str] = {}  # pid -> name of every listening process seen
        self.before: set[int] = set()  # ... of those listening already when the watch began
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
        for c in psutil.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                with_name = psutil.Process(c.pid).name() if psutil.pid_exists(c.pid) else "?"
                self.seen.add((c.laddr.ip, c.laddr.port, with_name))
                self.pids[c.pid] = with_name

    def _watch(self) -> None:
        while not self._stop.wait(0.3):
            try:
                self.sample()
            except psutil.Error:
                continue

    def off_loopback(self) -> list[tuple[str, int, str]]:
        return sorted(s for s in self.seen if s[0] not in LOOPBACK)

    def __enter__(self) -> ListenerWatch:
        self.sample()
        self.before = set(self.pids)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A one-node Ray cluster for this module; yields its address. Workers inherit this environment:
    their own TORA_HOME, sharing the test session's model cache."""
    home = tmp_path_factory.mktemp("ray_tora_home")
    models = Path(os.environ.get("TORA_TEST_MODELS", tmp_path_factory.getbasetemp() / "models"))
    models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(models, target_is_directory=True)
    # Ray's socket paths must stay short (a unix socket path has at most 107 bytes).
    temp = tempfile.mkdtemp(prefix="tora-ray-")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORA_HOME", str(home))
        mp.delenv("RAY_ADDRESS", raising=False)
        t0 = time.monotonic()
        ray.init(num_cpus=6, include_dashboard=False, _temp_dir=temp, namespace="tora", log_to_driver=False,
                 logging_level="ERROR")
        print(f"ray.init: {time.monotonic() - t0:.1f} s")
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            t0 = time.monotonic()
            ray.shutdown()
            print(f"ray.shutdown: {time.monotonic() - t0:.1f} s")


def tora(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TORA, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy())


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*TORA, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ.copy())


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_eval_on_ray_equals_the_one_process_run_and_listens_on_loopback_only(cluster: str, tmp_path: Path) -> None:
    data, released = fixture(tmp_path, problems=8, samples=2)
    args = ["eval", str(data), "--model", f"replay:{released}", "--samples", "2", "--json"]
    local = tora([*args, "--out", str(tmp_path / "local")])
    assert local.returncode == 0, local.stderr
    out = tmp_path / "ray"
    with ListenerWatch() as watch:
        dist = tora([*args, "--engine", "ray", "--address", cluster, "--actors", "2", "--out", str(out)])
    assert dist.returncode == 0, dist.stderr
    # The check saw Ray (GCS, raylet, the workers, the CLI's own driver), and nothing of it off loopback.
    assert len({port for _, port, _ in watch.seen}) >= 5, watch.seen
    assert any(name == "gcs_server" for *_, name in watch.seen) and any("ShardWorker" in name for *_, name in watch.seen)
    assert watch.off_loopback() == []

    merged = records(out / "trajectories.jsonl")
    assert signature(merged) == signature(records(tmp_path / "local" / "trajectories.jsonl"))
    assert len(merged) == 16 and len({r["id"] for r in merged}) == 16
    m_local, m_ray = json.loads(local.stdout), json.loads(dist.stdout)
    for key in ("accuracy", "correct", "trajectories", "maj_at_k", "pass_at_k", "missing"):
        assert m_ray[key] == m_local[key], key
    assert m_ray["complete"] is True
    manifest = json.loads((out / "manifest.json").read_text())
    engine = manifest["runs"][-1]["engine"]
    assert engine["name"] == "ray" and [w["name"] for w in engine["workers"]] == ["s1-w0", "s1-w1"]
    assert manifest["backend"]["name"] == "replay"
    # Both workers had work, each problem was leased once, and every lease ended.
    assert all(shard_units(out)[(f"p{i}", k)] == 1 for i in range(8) for k in range(2))
    assert {s.name for s in (out / "shards").glob("*.jsonl") if s.stat().st_size} == {"s1-w0.jsonl", "s1-w1.jsonl"}
    events = list(read_leases(out))
    leased = Counter(p for e in events if e.event == "lease" for p in e.problems)
    assert leased == Counter({f"p{i}": 1 for i in range(8)})
    assert Counter(e.event for e in events)["done"] == sum(e.event == "lease" for e in events)


def expected(problems: int, samples: int) -> list[tuple[str, int, str, str, bool]]:
    """What the fixture's recordings say each trajectory ends with (written here, not computed by tora)."""
    return sorted((f"p{i}", k, str(i + k % 2), "answered", k % 2 == 0) for i in range(problems) for k in range(samples))


def outcome(rows: list[dict[str, Any]]) -> list[tuple[str, int, str, str, bool]]:
    return sorted((r["problem"]["id"], r["sample_index"], r["result"]["final_answer"], r["result"]["finish"],
                   r["result"]["correct"]) for r in rows)


@pytest.mark.slow
def test_a_killed_workers_unfinished_problems_are_redone_once(cluster: str, tmp_path: Path) -> None:
    # Sample 1 of a problem ends 2 s after sample 0: a window in which its lease is part done.
    data, released = fixture(tmp_path, problems=6, samples=2, sleep=0.6, stagger=2.0)
    out = tmp_path / "ray"
    args = ["eval", str(data), "--model", f"replay:{released}", "--samples", "2", "--concurrency", "2", "--json"]
    proc = start([*args, "--engine", "ray", "--address", cluster, "--actors", "2", "--out", str(out)])
    try:
        victim = out / "shards" / "s1-w0.jsonl"

        def partly_done() -> bool:
            """s1-w0 has recorded part of a lease it has not finished: killing it now loses work in flight."""
            in_flight = {p for e in open_leases(list(read_leases(out))) if e.worker == "s1-w0" for p in e.problems}
            lines = victim.read_bytes().split(b"\n")[:-1] if victim.exists() else []
            return any(json.loads(line)["problem"]["id"] in in_flight for line in lines)

        wait_for(partly_done, 120, "a record of worker s1-w0 from a lease it has not finished")
        ray.kill(ray.get_actor(f"{actor_prefix(out)}-s1-w0", namespace="tora"), no_restart=True)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "worker lost: s1-w0" in stderr
    events = list(read_leases(out))
    lost = {e.lease for e in events if e.event == "lost"}
    assert lost and {e.worker for e in events if e.event == "lost"} == {"s1-w0"}
    assert any(e.event == "start" and e.worker == "s1-w0r1" for e in events)  # a replacement
    # The problems of the lost leases were leased once more, the others once.
    again = {p for e in events if e.event == "lease" and e.lease in lost for p in e.problems}
    leased = Counter(p for e in events if e.event == "lease" for p in e.problems)
    assert again and leased == Counter({f"p{i}": 2 if f"p{i}" in again else 1 for i in range(6)})
    # Never twice: over all shards, each unit of work was recorded exactly once, so what the lost
    # worker had recorded was not run again; what it had in flight was run once, elsewhere.
    units = shard_units(out)
    assert units == Counter({(f"p{i}", k): 1 for i in range(6) for k in range(2)})
    victim_units = [(r["problem"]["id"], r["sample_index"]) for r in records(victim)]
    assert any(pid in again for pid, _ in victim_units), (victim_units, again)
    assert outcome(records(out / "trajectories.jsonl")) == expected(6, 2)
    assert json.loads(stdout)["complete"] is True


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_runs_the_rest_once(cluster: str, tmp_path: Path) -> None:
    data, released = fixture(tmp_path, problems=6, samples=2, sleep=0.6)
    out = tmp_path / "ray"
    args = ["eval", str(data), "--model", f"replay:{released}", "--samples", "2", "--concurrency", "2",
            "--engine", "ray", "--address", cluster, "--actors", "2", "--out", str(out), "--json"]
    proc = start(args)
    try:
        wait_for(lambda: sum(u for u in shard_units(out).values()) >= 3, 120, "three records")
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies; Ray reaps its workers
        proc.wait(timeout=30)
    finally:
        proc.kill()

    def workers_gone() -> bool:
        """Both workers are dead: nothing more lands in the shards after this (they may outlive the driver briefly)."""
        for w in ("s1-w0", "s1-w1"):
            try:
                ray.get_actor(f"{actor_prefix(out)}-{w}", namespace="tora")
            except ValueError:
                continue
            return False
        return True

    wait_for(workers_gone, 60, "the first session's workers to be reaped")
    before = shard_units(out)
    assert 3 <= sum(before.values()) < 12
    again = tora([*args, "--resume"])
    assert again.returncode == 0, again.stderr
    merged = records(out / "trajectories.jsonl")
    assert outcome(merged) == expected(6, 2) and len({r["id"] for r in merged}) == 12
    # What the first session recorded was kept, not run again; the rest ran once.
    assert shard_units(out) == Counter({(f"p{i}", k): 1 for i in range(6) for k in range(2)})
    events = list(read_leases(out))
    assert {e.session for e in events} == {1, 2}
    assert {e.worker for e in events if e.event == "start"} == {"s1-w0", "s1-w1", "s2-w0", "s2-w1"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["runs"]) == 2 and json.loads(again.stdout)["complete"] is True
    assert json.loads(again.stdout)["resumed"] == sum(before.values())


@pytest.mark.model
@pytest.mark.slow
def test_the_embedded_model_runs_in_a_worker(cluster: str, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    proc = tora(["eval", "gsm8k", "--limit", "1", "--model", "embedded-tiny", "--max-tokens", "256", "--engine", "ray",
                 "--address", cluster,
                 "--actors", "1", "--out", str(out), "--json"], timeout=900)
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    assert m["trajectories"] == 1 and m["complete"] is True
    recs = records(out / "trajectories.jsonl")
    assert len(recs) == 1 and {r["generation"]["backend"] for r in recs} == {"llama.cpp"}
    assert all(r["steps"] and r["steps"][0]["type"] == "text" and r["result"]["grade_status"] for r in recs)
    assert all(r["stats"]["completion_tokens"] > 0 for r in recs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"]["name"] == "llama.cpp" and manifest["runs"][-1]["engine"]["name"] == "ray"
    assert records(out / "shards" / "s1-w0.jsonl") == recs  # the merged record is the worker's, verbatim


def test_curate_on_ray_keeps_what_one_process_keeps(cluster: str, tmp_path: Path) -> None:
    # Per problem: right, the same right again (a duplicate), right in other words, wrong.
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "question": f"What is {i}?", "answer": str(i)}) + "\n"
                            for i in range(6)))
    released = write_released(tmp_path / "samples.jsonl", [
        {"idx": f"p{i}", "question": f"What is {i}?",
         "code": [says(i), says(i), says(i).replace("Let me compute.", "Compute it:"), says(i + 1)]}
        for i in range(6)])
    evalset = Path(__file__).parent / "data" / "evalsets" / "gsm8k" / "test.jsonl"
    args = ["curate", str(data), "--model", f"replay:{released}", "--samples", "4", "--max-per-problem", "2",
            "--eval-sets", str(evalset)]
    local = tora([*args, "--out", str(tmp_path / "local")])
    assert local.returncode == 0, local.stderr
    out = tmp_path / "ray"
    dist = tora([*args, "--engine", "ray", "--address", cluster, "--actors", "2", "--out", str(out)])
    assert dist.returncode == 0, dist.stderr
    for name in ("trajectories.jsonl", "curated.jsonl"):
        assert signature(records(out / name)) == signature(records(tmp_path / "local" / name)), name
    kept = records(out / "curated.jsonl")
    assert len(kept) == 12 and len({r["id"] for r in kept}) == 12  # 2 of the 3 right ones, each problem
    by_id = {r["id"]: r for r in records(out / "trajectories.jsonl")}
    assert all(by_id[r["id"]] == r for r in kept)  # kept records are the recorded ones, verbatim
    m_local = json.loads((tmp_path / "local" / "metrics.json").read_text())["curation"]
    m_ray = json.loads((out / "metrics.json").read_text())["curation"]
    for key in ("kept", "problems_with_kept", "problems_final", "duplicates", "eligible"):
        assert m_ray[key] == m_local[key], key
    # Each worker kept the problems it ran: the kept shards are what was merged.
    shards = sorted(p.name for p in (out / "shards").glob("*.curated.jsonl") if p.stat().st_size)
    assert shards == ["s1-w0.curated.jsonl", "s1-w1.curated.jsonl"]


@pytest.mark.slow
def test_a_private_cluster_listens_on_loopback_only_and_is_stopped(tmp_path: Path) -> None:
    # No --address: tora starts Ray itself. The environment given lacks the loopback settings,
    # so what keeps Ray on 127.0.0.1 is tora's own doing.
    data, released = fixture(tmp_path, problems=2, samples=1)
    env = {k: v for k, v in os.environ.items() if k not in LOOPBACK_ENV and k != "RAY_ADDRESS"}
    out = tmp_path / "ray"
    with ListenerWatch() as watch:
        proc = subprocess.run([*TORA, "eval", str(data), "--model", f"replay:{released}", "--engine", "ray",
                               "--actors", "1", "--out", str(out), "--json"],
                              capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["complete"] is True and len(records(out / "trajectories.jsonl")) == 2
    daemons = {pid for pid, name in watch.pids.items() if name in ("gcs_server", "raylet") and pid not in watch.before}
    assert len(daemons) >= 2, watch.pids  # the check saw the CLI's own GCS and raylet listening
    assert watch.off_loopback() == []
    # Stopped on the way out: none of them outlives the CLI.
    wait_for(lambda: not any(psutil.pid_exists(pid) for pid in daemons), 30, "the private cluster to stop")
