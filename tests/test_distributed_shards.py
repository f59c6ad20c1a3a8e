"""The cluster layer's files, without a cluster: shard merges, the lease log, the eval plan.

The merge is what keeps a run spread over workers duplicate-free: these
tests write shards the way workers do (TrajectoryWriter) and tear them the
way a kill does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trajectory_fixtures import Spec, build

from tora.distributed.leases import LeaseEvent, LeaseLog, open_leases, read_leases
from tora.distributed.plan import EvalPlan
from tora.distributed.shards import MergeCounts, ShardMerge, merge_shards, shard_files
from tora.engine import SamplingParams, SolveConfig
from tora.evaluate import load_finished
from tora.record import Problem, Trajectory, TrajectoryWriter, read_trajectories


def rec(pid: str, k: int, finish: str = "answered", answer: str = "1") -> Trajectory:
    return build(Spec(pid, f"What is {pid}?", "1", final=f"So \\boxed{{{answer}}}.", finish=finish,
                      final_answer=answer, sample_index=k))


def write(path: Path, *records: Trajectory) -> None:
    with TrajectoryWriter(path) as w:
        for t in records:
            w.append_sync(t)


def ids(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def test_merge_copies_each_shard_record_once_byte_for_byte(tmp_path: Path) -> None:
    a0, a1, b0 = rec("a", 0), rec("a", 1), rec("b", 0)
    write(shard_files(tmp_path, "s1-w0")[0], a0, a1)
    write(shard_files(tmp_path, "s1-w1")[0], b0)
    merge = ShardMerge(tmp_path)
    merge.load()
    assert merge.merge() == MergeCounts(added=3)
    merged = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    shard_lines = {line for n in ("s1-w0", "s1-w1") for line in shard_files(tmp_path, n)[0].read_text().splitlines()}
    assert set(merged) == shard_lines and len(merged) == 3  # verbatim copies
    assert merge.merge() == MergeCounts()  # nothing new
    # A worker appends more: the next merge reads only that.
    b1 = rec("b", 1)
    write(shard_files(tmp_path, "s1-w1")[0], b1)
    assert merge.merge() == MergeCounts(added=1)
    merge.close()
    # A fresh merge (a new session) adds nothing twice.
    assert merge_shards(tmp_path) == MergeCounts(duplicates=4)
    assert sorted(ids(tmp_path / "trajectories.jsonl")) == sorted(t.id for t in (a0, a1, b0, b1))


def test_a_line_being_written_waits_and_a_torn_one_is_skipped(tmp_path: Path) -> None:
    shard = shard_files(tmp_path, "s1-w0")[0]
    a0, a1 = rec("a", 0), rec("a", 1)
    write(shard, a0)
    line = a1.model_dump_json().encode()
    with shard.open("ab") as f:
        f.write(line[:40])  # the worker is half-way through its write
    merge = ShardMerge(tmp_path)
    merge.load()
    assert merge.merge() == MergeCounts(added=1)
    with shard.open("ab") as f:
        f.write(line[40:] + b"\n")  # ... and finishes it
    assert merge.merge() == MergeCounts(added=1)
    # Killed mid-write: the next writer starts on a fresh line, the torn one is not a record.
    with shard.open("ab") as f:
        f.write(rec("a", 2).model_dump_json().encode()[:55])
    a3 = rec("a", 3)
    write(shard, a3)
    assert merge.merge() == MergeCounts(added=1, invalid=1)
    merge.close()
    assert ids(tmp_path / "trajectories.jsonl") == [a0.id, a1.id, a3.id]


def test_a_unit_run_twice_is_merged_once_and_a_retry_after_an_error_is_kept(tmp_path: Path) -> None:
    # A worker presumed lost kept running: two settled records of a/0. An error
    # of b/0 was run again: both records belong to the history, as in one process.
    first, second = rec("a", 0, answer="1"), rec("a", 0, answer="2")
    failed, retried = rec("b", 0, finish="error"), rec("b", 0)
    write(shard_files(tmp_path, "s1-w0")[0], first, failed)
    write(shard_files(tmp_path, "s1-w1")[0], second, retried)
    assert merge_shards(tmp_path) == MergeCounts(added=3, duplicates=1)
    merged = list(read_trajectories(tmp_path / "trajectories.jsonl"))
    assert [t.id for t in merged] == [first.id, failed.id, retried.id]
    assert {pair: t.id for pair, t in load_finished(tmp_path / "trajectories.jsonl").items()} == {
        ("a", 0): first.id, ("b", 0): retried.id}


def test_kept_shards_merge_into_curated_by_id_after_the_records(tmp_path: Path) -> None:
    a0, a1 = rec("a", 0), rec("a", 1)
    records, kept = shard_files(tmp_path, "s1-w0")
    write(records, a0, a1)
    write(kept, a0)
    write(shard_files(tmp_path, "s2-w0")[1], a0)  # a re-leased problem settled again: the same record
    seen: list[tuple[str, bool]] = []
    merge = ShardMerge(tmp_path, observe=lambda t, is_kept: seen.append((t.id, is_kept)))
    merge.load()
    assert merge.merge() == MergeCounts(added=2, kept=1, duplicates=1)
    merge.close()
    assert ids(tmp_path / "curated.jsonl") == [a0.id]
    assert seen == [(a0.id, False), (a1.id, False), (a0.id, True)]
    # The records file is never confused with the kept file of the same worker.
    assert ids(tmp_path / "trajectories.jsonl") == [a0.id, a1.id]


def test_a_merge_killed_half_way_is_completed_without_a_duplicate(tmp_path: Path) -> None:
    a0, a1 = rec("a", 0), rec("a", 1)
    write(shard_files(tmp_path, "s1-w0")[0], a0, a1)
    target = tmp_path / "trajectories.jsonl"
    torn = a1.model_dump_json().encode()[:70]
    target.write_bytes((a0.model_dump_json() + "\n").encode() + torn)
    assert merge_shards(tmp_path) == MergeCounts(added=1, duplicates=1)
    # The torn copy stays where it was (nothing is deleted), the record follows on a line of its own.
    assert target.read_bytes().split(b"\n")[1] == torn
    assert [t.id for t in read_trajectories(target, skip_invalid=True)] == [a0.id, a1.id]


def test_lease_log_round_trip_and_open_leases(tmp_path: Path) -> None:
    log = LeaseLog(tmp_path)
    log.write(LeaseEvent(event="start", lease="", worker="s1-w0", session=1, node="n", host="h", pid=7))
    log.write(LeaseEvent(event="lease", lease="1-1", worker="s1-w0", session=1, problems=["a", "b"]))
    log.write(LeaseEvent(event="lease", lease="1-2", worker="s1-w0", session=1, problems=["c"]))
    log.write(LeaseEvent(event="done", lease="1-1", worker="s1-w0", session=1))
    log.close()
    with (tmp_path / "leases.jsonl").open("ab") as f:
        f.write(b'{"event": "lost", "lea')  # the driver was killed mid-write
    log = LeaseLog(tmp_path)
    log.write(LeaseEvent(event="lease", lease="2-1", worker="s2-w0", session=2, problems=["c"]))
    log.close()
    events = list(read_leases(tmp_path))
    assert [e.event for e in events] == ["start", "lease", "lease", "done", "lease"]
    assert [e.lease for e in open_leases(events)] == ["1-2", "2-1"]


def test_eval_plan_runs_only_the_samples_without_a_finished_record() -> None:
    plan = EvalPlan(samples=3, config=SolveConfig(sampling=SamplingParams(temperature=0.7, seed=10)))
    problem = Problem(id="a", text="What is a?", answer="1")
    prior = [rec("a", 0), rec("a", 2, finish="interrupted"), rec("a", 5)]
    assert plan.pending(problem, prior, [])
    assert plan.begin(problem, prior, []) == []
    jobs = list(plan.jobs(problem))
    assert [(j.sample_index, j.config.sampling.seed if j.config else None) for j in jobs] == [(1, 11), (2, 12)]
    assert not plan.pending(problem, [rec("a", 0), rec("a", 1), rec("a", 2, finish="error")], [])


def test_a_majority_tie_goes_to_the_lowest_sample_in_any_finishing_order() -> None:
    # Engines (and two runs of one) finish samples in different orders; maj@k must not depend on it.
    from tora.metrics import majority_correct
    from tora.scheduler import Graded

    right = Graded(rec("a", 0, answer="1").model_copy(update={"result": rec("a", 0).result.model_copy(
        update={"correct": True})}), pred="1")
    wrong = Graded(rec("a", 1, answer="2").model_copy(update={"result": rec("a", 1, answer="2").result.model_copy(
        update={"correct": False})}), pred="2")
    assert majority_correct([right, wrong]) is True
    assert majority_correct([wrong, right]) is True


def test_the_progress_table_sums_workers_per_node_and_measures_rates() -> None:
    import io

    from rich.console import Console

    from tora.distributed.progress import ClusterProgress
    from tora.distributed.worker import WorkerStats

    def stats(name: str, node: str, at: float, tokens: int, done: int) -> WorkerStats:
        return WorkerStats(name=name, node=node, host="h", at=at, tokens=tokens, trajectories=done, errors=0,
                           correct=done // 2, in_flight=3, waiting=2, grading=1, kernels_live=2, kernels_limit=4,
                           problems=5)

    out = io.StringIO()
    with ClusterProgress(Console(file=out, width=200), "eval", 10) as progress:
        progress.update([stats("s1-w0", "n1", 0.0, 0, 0), stats("s1-w1", "n1", 0.0, 0, 0),
                         stats("s1-w2", "n2", 0.0, 0, 0)], done=0, lost=0)
        progress.update([stats("s1-w0", "n1", 2.0, 200, 4), stats("s1-w1", "n1", 2.0, 100, 2),
                         stats("s1-w2", "n2", 2.0, 50, 1)], done=3, lost=1)
        rows = {r.node: r for r in progress.rows()}
    # Two nodes on one host: told apart by node id; each row sums its workers, rates over the window.
    assert set(rows) == {"h:n1", "h:n2"}
    n1 = rows["h:n1"]
    assert n1.workers == 2 and n1.tokens_s == 150 and n1.trajectories_s == 3
    assert (n1.in_flight, n1.waiting, n1.kernels_live, n1.kernels_limit, n1.problems) == (6, 4, 4, 8, 10)
    assert rows["h:n2"].tokens_s == 25
    text = out.getvalue()  # not a terminal: plain lines, the last with the totals
    assert "eval 3/10 problems, 7 trajectories, 3.50 traj/s, 175 tok/s, 3 workers" in text and "1 workers lost" in text


def test_eval_refuses_a_folder_whose_shards_hold_records_without_resume(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import tora_in_process

    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"id": "a", "question": "What is a?", "answer": "1"}) + "\n")
    out = tmp_path / "run"
    write(shard_files(out, "s1-w0")[0], rec("a", 0))  # a cluster run killed before its first merge
    code, _, err = tora_in_process(["eval", str(data), "--model", "replay:none.jsonl", "--out", str(out)], capsys)
    assert code == 2 and "add --resume" in err
    assert not (out / "trajectories.jsonl").exists()
    # --engine flags without the engine are a usage error too.
    code, _, err = tora_in_process(["eval", str(data), "--actors", "2", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "--actors need --engine ray" in err
