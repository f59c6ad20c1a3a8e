"""A curation run in its report: the run's yield, and every trajectory marked kept or not and why.

`curated.jsonl` alone is 100 % correct by construction, so a report of it
says nothing of the run. This reads the run folder the way `tora curate`
left it: the latest record of each sample in `trajectories.jsonl`, the kept
ones in `curated.jsonl` (with any teacher corrections `tora correct` kept),
and the problems the contamination check excluded. Each sample that was not
kept gets the first reason that applies, in the order the keep rule tests
them (`tora.curation`): it failed (error, interrupted), it was wrong, a cell
failed, an identical one was kept (duplicate), its problem already kept
`--max-per-problem` (over the cap), or its problem is not final yet.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tora.curation import KeepRule, content_hash, tool_errors
from tora.record import Trajectory, read_trajectories
from tora.run_dir import CONTAMINATION, CURATED, TRAJECTORIES

KEPT = "kept"
REASONS = ("failed", "wrong", "tool error", "duplicate", "over the cap", "not final yet")


@dataclass(frozen=True)
class CurationRun:
    records: list[Trajectory]  # every sample's latest record, then the kept teacher corrections
    why: list[str]  # per record: KEPT or one of REASONS
    contaminated: int  # problems excluded before sampling

    def yield_counts(self) -> dict[str, int]:
        """sampled, graded correct, kept, and each reason (samples only; corrections are counted apart)."""
        samples = [(t, w) for t, w in zip(self.records, self.why, strict=True) if t.origin != "teacher_corrected"]
        reasons = Counter(w for _, w in samples)
        return {"sampled": len(samples), "correct": sum(t.result.correct is True for t, _ in samples),
                KEPT: reasons[KEPT], **{r: reasons[r] for r in REASONS},
                "corrections kept": len(self.records) - len(samples), "contaminated problems": self.contaminated}


def _excluded(path: Path) -> int:
    if not path.is_file():
        return 0
    count = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        count += isinstance(row, dict) and row.get("excluded") is True
    return count


def read_curation(run_dir: Path, manifest: dict[str, Any] | None) -> CurationRun | None:
    """The run in `run_dir` if it is a curation run, else None."""
    if not manifest or manifest.get("command") != "curate" or not (run_dir / TRAJECTORIES).is_file():
        return None
    # The latest record of each sample, an interrupted one too (a killed run's, shown as failed).
    latest = {(t.problem.id, t.sample_index): t for t in read_trajectories(run_dir / TRAJECTORIES, skip_invalid=True)}
    samples = list(latest.values())
    curated = list(read_trajectories(run_dir / CURATED, skip_invalid=True)) if (run_dir / CURATED).is_file() else []
    kept_ids = {t.id for t in curated}
    kept_hashes = {content_hash(t) for t in curated}
    kept_per_problem = Counter(t.problem.id for t in curated if t.origin != "teacher_corrected")
    rule = KeepRule(keep_tool_errors=manifest.get("keep_tool_errors") is True)
    cap = manifest.get("max_per_problem")

    def why(t: Trajectory) -> str:
        if t.id in kept_ids:
            return KEPT
        if t.result.finish in ("error", "interrupted"):
            return "failed"
        if t.result.correct is not True or t.result.finish != "answered":
            return "wrong"
        if not rule.keeps(t):
            return "tool error" if tool_errors(t) else "wrong"
        if content_hash(t) in kept_hashes:
            return "duplicate"
        if isinstance(cap, int) and kept_per_problem[t.problem.id] >= cap:
            return "over the cap"
        return "not final yet"

    corrections = [t for t in curated if t.origin == "teacher_corrected"]
    return CurationRun(records=samples + corrections, why=[why(t) for t in samples] + [KEPT] * len(corrections),
                       contaminated=_excluded(run_dir / CONTAMINATION))
