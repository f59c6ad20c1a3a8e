"""What curation keeps, and that settling a group is idempotent: the pure logic under
`tora curate` / `tora correct`, plus the torn-tail repair and the run-folder lock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tora.curation import KeepRule, Ledger, Work, infra_failure, rank
from tora.errors import UsageError
from tora.record import Problem, Trajectory, TrajectoryWriter, read_trajectories, repair_tail
from tora.record.schema import (
    CodeStep,
    ErrorInfo,
    ExecutionStep,
    Generation,
    PromptRef,
    Result,
    Runtime,
    Sampling,
    TextStep,
)
from tora.run_dir import locked


def traj(pid: str, k: int, *, answer: str = "1", correct: bool | None = True, finish: str = "answered",
         cell: str = "ok", error: str | None = None) -> Trajectory:
    text = f"```python\nprint({answer})\n```\n"
    steps = [TextStep(content=text), CodeStep(content=f"print({answer})\n"),
             ExecutionStep(status=cell, rendered=answer, observation=f"```output\n{answer}\n```\n"),  # type: ignore[arg-type]
             TextStep(content=f"So $\\boxed{{{answer}}}$.")]
    t = Trajectory(problem=Problem(id=pid, text=f"Q {pid}?", answer="1"), sample_index=k,
                   generation=Generation(backend="b", model="m", spec="s", prompt_template=PromptRef(name="p", sha256="0"),
                                         sampling=Sampling(), max_tool_calls=4),
                   runtime=Runtime(), prompt="P\n", steps=steps,
                   result=Result(finish=finish, correct=correct,  # type: ignore[arg-type]
                                 error=ErrorInfo(kind=error, message="x") if error else None))  # type: ignore[arg-type]
    t.content_hash = t.compute_content_hash()
    return t


def ledger(cap: int | None = None, seed: int = 0, rule: KeepRule | None = None) -> Ledger:
    rule = rule or KeepRule()
    return Ledger(key=lambda t: (t.problem.id, t.sample_index), group=lambda t: t.problem.id, eligible=rule.keeps,
                  cap=cap, seed=seed)


def test_the_keep_rule_wants_a_correct_answer_and_clean_cells() -> None:
    rule = KeepRule()
    assert rule.keeps(traj("a", 0))
    assert not rule.keeps(traj("a", 0, correct=False))
    assert not rule.keeps(traj("a", 0, correct=None))
    assert not rule.keeps(traj("a", 0, finish="max_tokens"))
    assert not rule.keeps(traj("a", 0, cell="error"))
    assert KeepRule(keep_tool_errors=True).keeps(traj("a", 0, cell="timeout"))
    # A correction is judged on what follows its prefix: the failed cell before step 3 is the parent's.
    assert rule.keeps(traj("a", 0, cell="error"), since_step=3)


def test_infrastructure_failures_are_told_from_the_models() -> None:
    assert infra_failure(traj("a", 0, finish="error", correct=None, error="backend"))
    assert infra_failure(traj("a", 0, finish="error", correct=None, error="sandbox"))
    assert not infra_failure(traj("a", 0, finish="answered", error="grader"))
    assert not infra_failure(traj("a", 0, correct=False))


def test_duplicates_are_dropped_and_the_cap_picks_by_a_seeded_rank() -> None:
    led = ledger(cap=2, seed=7)
    records = [traj("a", k, answer="1" if k < 3 else "1 ") for k in range(6)]
    # Samples 0-2 are the same trajectory; 3-5 another one (its answer carries a space).
    for t in records:
        led.add_record(t)
    kept = led.settle("a")
    assert len(kept) == 2 and len({t.content_hash for t in kept}) == 2
    best = {h: min((t for t in records if t.content_hash == h), key=lambda t: rank(7, t)) for h in
            {t.content_hash for t in records}}
    assert {t.id for t in kept} == {t.id for t in best.values()}  # the best-ranked of each content
    other = ledger(cap=2, seed=8)
    for t in records:
        other.add_record(t)
    assert all(t.content_hash in {k.content_hash for k in kept} for t in other.settle("a"))


def test_settling_again_completes_what_a_kill_cut_short_and_never_duplicates() -> None:
    records = [traj("a", k, answer=str(k), correct=True) for k in range(5)]
    for t in records:  # all correct by fiat: answer k graded correct
        t.result.correct = True
    full = ledger(cap=3)
    for t in records:
        full.add_record(t)
    whole = full.settle("a")
    assert len(whole) == 3
    # A kill after the first of the group's lines: a resume settles only the rest.
    resumed = ledger(cap=3)
    resumed.load(records, whole[:1])
    rest = resumed.settle("a")
    assert [t.id for t in rest] == [t.id for t in whole[1:]]
    for t in rest:
        resumed.add_kept(t)
    assert resumed.settle("a") == []  # settled: nothing more, however often it is asked
    # A group that grows later (a retried failure) only adds, up to the cap.
    grown = ledger(cap=None)
    grown.load(records[:2], [records[0]])
    assert [t.id for t in grown.settle("a")] == [records[1].id]


def test_what_another_verb_kept_counts_as_seen() -> None:
    sample = traj("a", 0)
    same = traj("a", 1)  # the same content as sample 0, under another unit of work
    led = ledger()
    led.load([same], [], seen=[sample])
    assert led.settle("a") == [] and led.duplicate_candidates() == 1


def test_work_is_final_when_every_unit_is_done_or_the_group_is_full() -> None:
    led = ledger(cap=1)
    work = Work(led, {"a": [("a", 0), ("a", 1)]}, stop_when_full=False)
    led.add_record(traj("a", 0))
    assert not work.final("a")
    assert list(work.pending("a")) == [("a", 1)]
    eager = Work(led, {"a": [("a", 0), ("a", 1)]}, stop_when_full=True)
    assert eager.final("a")  # one is kept, the cap is one
    failed = ledger()
    failed.add_record(traj("b", 0, finish="error", correct=None, error="kernel"))
    assert Work(failed, {"b": [("b", 0)]}).final("b")
    retrying = Work(failed, {"b": [("b", 0)]}, retry_errors=True)
    assert not retrying.final("b") and retrying.to_retry() == {("b", 0)}


def test_a_torn_last_line_is_moved_aside_and_a_whole_one_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TrajectoryWriter(path) as w:
        w.append_sync(traj("a", 0))
        w.append_sync(traj("a", 1))
    whole = path.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    path.write_bytes(whole + last[:50])  # half a record: a kill mid-write
    assert repair_tail(path) == 50
    assert path.read_bytes() == whole
    assert (tmp_path / "t.jsonl.torn").read_bytes() == last[:50] + b"\n"
    path.write_bytes(whole + last[:-1])  # a whole record that lost only its newline
    assert repair_tail(path) == 0
    assert path.read_bytes() == whole + last
    assert [t.sample_index for t in read_trajectories(path)] == [0, 1, 1]
    assert repair_tail(path) == 0 and repair_tail(tmp_path / "absent.jsonl") == 0


def test_one_run_at_a_time_holds_a_run_folder(tmp_path: Path) -> None:
    with locked(tmp_path, "curate"), pytest.raises(UsageError, match="another tora run"), locked(tmp_path, "correct"):
        pass
    with locked(tmp_path, "correct"):  # released on the way out
        assert json.dumps((tmp_path / ".lock").read_text()).startswith('"correct')
