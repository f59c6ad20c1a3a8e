"""Evaluation metrics from graded trajectories: a pure function, so a resumed
run, `tora eval` and any later reader compute the same figures.

Fractions are in [0, 1]. `accuracy` is over finished trajectories (all of
them when the run is complete: `missing` is then 0). With K samples per
problem, `pass_at_1` is each problem's fraction of correct samples averaged
over problems (how AIME and AMC results are usually reported: one greedy run of
30 problems is too noisy), `maj_at_k` votes on the normalised answers and
`pass_at_k` asks whether any sample was right.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from tora.grading import normalize_answer
from tora.record import ExecutionStep, Problem
from tora.scheduler import Graded

GROUP_KEYS = ("type", "level")  # Problem.meta keys that get their own table (MATH has both)


def _frac(num: int, den: int) -> float | None:
    return round(num / den, 6) if den else None


def majority_correct(samples: Sequence[Graded]) -> bool:
    """Self-consistency: the most common answer decides; a tie goes to the answer of the lowest
    sample index (not to the first to finish, which differs from run to run and between engines)."""
    votes: Counter[str] = Counter()
    first: dict[str, Graded] = {}
    for g in sorted(samples, key=lambda g: g.trajectory.sample_index):
        if not g.pred:
            continue
        key = normalize_answer(g.pred) or g.pred
        votes[key] += 1
        first.setdefault(key, g)
    if not votes:
        return False
    winner = votes.most_common(1)[0][0]
    return first[winner].correct


def _groups(graded: Sequence[Graded], problems: dict[str, Problem]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key in GROUP_KEYS:
        tally: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for g in graded:
            problem = problems.get(g.trajectory.problem.id, g.trajectory.problem)
            if key in problem.meta:
                cell = tally[str(problem.meta[key])]
                cell[0] += 1
                cell[1] += g.correct
        if tally:
            out[f"by_{key}"] = {
                name: {"n": n, "correct": c, "accuracy": _frac(c, n)}
                for name, (n, c) in sorted(tally.items(), key=lambda kv: _sort_key(kv[0]))
            }
    return out


def _sort_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def compute_metrics(
    graded: Sequence[Graded],
    problems: Sequence[Problem],
    *,
    samples: int,
    grader: str,
    wall_s: float | None = None,
) -> dict[str, Any]:
    by_id = {p.id: p for p in problems}
    per_problem: dict[str, list[Graded]] = defaultdict(list)
    for g in graded:
        per_problem[g.trajectory.problem.id].append(g)
    n = len(graded)
    correct = sum(g.correct for g in graded)
    cells = [s for g in graded for s in g.trajectory.steps if isinstance(s, ExecutionStep)]
    cell_status = Counter(c.status for c in cells)
    finish = Counter(g.trajectory.result.finish for g in graded)
    grade_status = Counter(g.trajectory.result.grade_status or "ungraded" for g in graded)
    metrics: dict[str, Any] = {
        "accuracy": _frac(correct, n),
        "correct": correct,
        "trajectories": n,
        "problems": len(by_id),
        "problems_attempted": len(per_problem),
        "samples": samples,
        "missing": len(by_id) * samples - n,
        "grader": grader,
    }
    attempted = list(per_problem.values())
    metrics["pass_at_1"] = (round(sum(sum(g.correct for g in s) / len(s) for s in attempted) / len(attempted), 6)
                            if attempted else None)
    if samples > 1:
        metrics["maj_at_k"] = _frac(sum(majority_correct(s) for s in attempted), len(attempted))
        metrics["pass_at_k"] = _frac(sum(any(g.correct for g in s) for s in attempted), len(attempted))
    else:
        metrics["pass_at_k"] = metrics["accuracy"]
    metrics.update(_groups(graded, by_id))
    metrics.update(
        {
            "empty_answers": sum(not g.pred for g in graded),
            "errors": finish.get("error", 0),
            "timeouts": sum(any(isinstance(s, ExecutionStep) and s.status == "timeout" for s in g.trajectory.steps)
                            for g in graded),
            "cell_timeouts": cell_status.get("timeout", 0),
            "kernel_deaths": cell_status.get("died", 0),
            "finish": dict(sorted(finish.items())),
            "grade_status": dict(sorted(grade_status.items())),
            "grade_timeouts": grade_status.get("timeout", 0),
            "unparsed": grade_status.get("unparsed", 0),
            "unsure": grade_status.get("unsure", 0),
            "tool_calls": len(cells),
            "mean_tool_calls": round(len(cells) / n, 4) if n else None,
            "exec_error_rate": _frac(len(cells) - cell_status.get("ok", 0), len(cells)),
            "mean_completion_tokens": round(sum(g.trajectory.stats.completion_tokens for g in graded) / n, 2)
            if n
            else None,
        }
    )
    if wall_s is not None:
        metrics["wall_s"] = round(wall_s, 3)
    return metrics
