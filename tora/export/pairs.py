"""Rows made of two trajectories: preference pairs and corrections.

`preference` (DPO, or KTO after unpairing; Orca-Math style): a correct and a
wrong trajectory of one problem, in TRL's standard preference format
(`prompt`, `chosen`, `rejected` strings). Only trajectories with the same
prompt are paired, and `prompt` is their question part, so `prompt + chosen`
is the chosen trajectory's `tora` text. A failed trajectory (finish `error`
or `interrupted`) and an ungraded one (`correct` null, e.g. `unparsed`) is
never paired: neither says anything about the model's answer. Pairing is
deterministic: candidates are ordered by (sample_index, content_hash, id) and drawn with a
generator seeded by the seed and the problem id, so a problem's pairs do not
change when other problems are added.

`correction` (LeMa style): a teacher-corrected trajectory (origin
`teacher_corrected`) and the wrong trajectory it corrects (`parent`). The
correction keeps the first `prefix_lines` lines of the parent's completion;
when a record does not carry `prefix_lines` it is the number of leading lines
both completions share. A correction whose parent is not among the records
is skipped and counted.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tora.export.view import failed, question_part, question_text
from tora.record import Trajectory


def _order(t: Trajectory) -> tuple[int, str, str]:
    return (t.sample_index, t.content_hash or t.compute_content_hash(), t.id)


def preference_rows(records: Sequence[Trajectory], *, seed: int = 0, per_problem: int = 1) -> Iterator[dict[str, Any]]:
    groups: dict[tuple[str, str], list[Trajectory]] = defaultdict(list)
    for t in records:
        if not failed(t) and t.result.correct is not None:
            groups[(t.problem.id, t.prompt)].append(t)
    for (problem_id, _prompt), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        chosen = sorted((t for t in group if t.result.correct), key=_order)
        rejected = sorted((t for t in group if not t.result.correct), key=_order)
        if not chosen or not rejected:
            continue
        rng = random.Random(f"{seed}:{problem_id}")
        picks = rng.sample(range(len(chosen) * len(rejected)), min(per_problem, len(chosen) * len(rejected)))
        for k in sorted(picks):
            good, bad = chosen[k // len(rejected)], rejected[k % len(rejected)]
            yield {
                "prompt": question_part(good),
                "chosen": good.completion(),
                "rejected": bad.completion(),
                "meta": {"problem_id": problem_id, "chosen_id": good.id, "rejected_id": bad.id,
                         "rejected_finish": bad.result.finish, "answer": good.problem.answer},
            }


def shared_lines(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.splitlines(keepends=True), b.splitlines(keepends=True), strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class CorrectionStats:
    missing_parent: list[str] = field(default_factory=list)  # ids of corrections whose parent was not found
    inconsistent: list[str] = field(default_factory=list)  # prefix_lines does not match the parent


def correction_rows(records: Sequence[Trajectory], parents: Iterable[Trajectory],
                    stats: CorrectionStats) -> Iterator[dict[str, Any]]:
    by_id = {t.id: t for t in parents}
    by_id.update((t.id, t) for t in records)
    for child in records:
        if child.origin != "teacher_corrected" or failed(child):
            continue
        parent = by_id.get(child.parent or "")
        if parent is None:
            stats.missing_parent.append(child.id)
            continue
        wrong, corrected = parent.completion(), child.completion()
        recorded = getattr(child, "prefix_lines", None)  # schema 1.1; absent from 1.0 records
        lines = recorded if isinstance(recorded, int) else shared_lines(wrong, corrected)
        kept = "".join(wrong.splitlines(keepends=True)[:lines])
        if not corrected.startswith(kept):
            stats.inconsistent.append(child.id)
            continue
        yield {
            "question": question_text(child),
            "prompt": question_part(child),
            "wrong": wrong,
            "corrected": corrected,
            "prefix_lines": lines,
            "continuation": corrected[len(kept) :],
            "meta": {"problem_id": child.problem.id, "wrong_id": parent.id, "corrected_id": child.id,
                     "wrong_answer": parent.result.final_answer, "corrected_answer": child.result.final_answer,
                     "answer": child.problem.answer, "correct": child.result.correct},
        }
