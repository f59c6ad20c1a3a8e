"""`tora grade FILE`: accuracy of recorded trajectories, ToRA's released outputs, or answer pairs.

The format is detected from the first record: tora trajectories carry
`schema_version`; ToRA's released rows carry `idx`, `question` and `code`.
`--pairs` reads lines `{"pred": ..., "ref": ...}` instead.

With `--json`, stdout holds only JSON lines: one per graded item (per
disagreement with `--diff`) and, last, a summary with `accuracy` and the
counts. With `--pairs --json`, exactly one line per pair.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from tora.errors import DataError
from tora.grading import (
    DEFAULT_GRADER,
    DEFAULT_TIMEOUT,
    GRADERS,
    ItemGrade,
    grade_many,
    grade_released,
    grade_trajectories,
)
from tora.grading.api import GradeResult
from tora.jsonl import file_format, iter_objects
from tora.record.writer import read_trajectories
from tora.released import read_released


def _load_items(path: Path, grader: str, timeout: float) -> tuple[str, list[ItemGrade]]:
    sniffed = file_format(path)
    if sniffed.format == "trajectories":
        return "trajectories", grade_trajectories(list(read_trajectories(path)), grader, timeout)
    if sniffed.format == "released":
        return "released", grade_released(list(read_released(path)), grader, timeout)
    hint = {"pairs": "; for {pred, ref} lines use --pairs",
            "dataset": "; it looks like a data set: evaluate a model on it with `tora eval FILE`"}.get(sniffed.format, "")
    raise DataError(
        path, sniffed.line, None,
        f"neither tora trajectories (schema_version) nor ToRA's released format (idx, question, code){hint}",
    )


def _answer_text(path: Path, line_no: int, row: dict[str, Any], field: str, required: bool) -> str | None:
    if field not in row:
        if required:
            raise DataError(path, line_no, field, "missing")
        return None
    value = row[field]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(path, line_no, field, f"expected text or a number, got {type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def read_pairs(path: Path) -> list[tuple[int, str | None, str | None]]:
    """(line, pred, ref) for each line `{"pred": ..., "ref": ...}`; `pred` may be null (no answer)."""
    pairs: list[tuple[int, str | None, str | None]] = []
    for line_no, row in iter_objects(path):
        pred = _answer_text(path, line_no, row, "pred", required=True)
        ref = _answer_text(path, line_no, row, "ref", required=True)
        if ref is None or not ref.strip():
            raise DataError(path, line_no, "ref", "empty: a pair needs a reference answer")
        pairs.append((line_no, pred, ref))
    if not pairs:
        raise DataError(path, None, None, "empty file: nothing to grade")
    return pairs


def summarize(items: Sequence[ItemGrade]) -> dict[str, Any]:
    """Counts and accuracy; accuracy is over items that have a reference answer."""
    counts = {"total": len(items), "correct": 0, "wrong": 0, "empty": 0, "unparsed": 0, "unsure": 0, "timeout": 0, "error": 0,
              "no_reference": 0}
    for item in items:
        counts[_bucket(item.pred, item.ref, item.result)] += 1
    graded = counts["total"] - counts["no_reference"]
    accuracy = counts["correct"] / graded if graded else None
    return {
        "accuracy": accuracy,
        "accuracy_pct": None if accuracy is None else round(accuracy * 100, 1),
        "graded": graded,
        **counts,
    }


def _bucket(pred: str | None, ref: str | None, result: GradeResult) -> str:
    if not (ref or "").strip():
        return "no_reference"
    if result.status != "ok":
        return result.status
    if result.equal:
        return "correct"
    return "empty" if not (pred or "").strip() else "wrong"


def _item_json(item: ItemGrade) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": item.id,
        "sample_index": item.sample_index,
        "pred": item.pred,
        "ref": item.ref,
        "extracted_by": item.extracted_by,
        "equal": item.result.equal,
        "status": item.result.status,
    }
    if item.result.detail:
        out["detail"] = item.result.detail
    return out


def _emit(obj: dict[str, Any]) -> None:
    click.echo(json.dumps(obj, ensure_ascii=False))


def _print_summary(title: str, summary: dict[str, Any], extra: dict[str, Any]) -> None:
    keys = ["accuracy_pct", "correct", "graded", "wrong", "empty", "unparsed", "unsure", "timeout", "error", "no_reference"]
    rows = [(k, summary[k]) for k in keys] + list(extra.items())
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table()
        table.add_column("measure")
        table.add_column("value", justify="right")
        for key, value in rows:
            table.add_row(key, str(value))
        console = Console()
        console.print(title, markup=False, highlight=False)
        console.print(table)
    else:
        click.echo(title)
        for key, value in rows:
            click.echo(f"{key}: {value}")


def _grade_pairs(path: Path, grader: str, as_json: bool, timeout: float) -> None:
    pairs = read_pairs(path)
    results = grade_many([(p, r) for _, p, r in pairs], grader, timeout)
    if as_json:
        for (line_no, pred, ref), result in zip(pairs, results, strict=True):
            _emit(
                {
                    "line": line_no,
                    "pred": pred,
                    "ref": ref,
                    "equal": result.equal is True,  # status tells unparsed/timeout apart from a real False
                    "status": result.status,
                    "grader": result.grader,
                    **({"detail": result.detail} if result.detail else {}),
                }
            )
        return
    for (line_no, pred, ref), result in zip(pairs, results, strict=True):
        verdict = {True: "equal", False: "not equal", None: result.status}[result.equal]
        click.echo(f"{line_no}: {pred!r} vs {ref!r}: {verdict}")
    items = [ItemGrade(id=str(n), pred=p, ref=r, extracted_by=None, result=res) for (n, p, r), res in zip(pairs, results, strict=True)]
    _print_summary(f"{path} ({grader})", summarize(items), {})


@click.command("grade")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--grader", type=click.Choice(GRADERS), default=DEFAULT_GRADER, show_default=True, help="Equivalence judge.")
@click.option("--diff", is_flag=True, help="Grade with both graders and list every item where they disagree.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout only; the last line is the summary.")
@click.option("--pairs", is_flag=True, help='FILE holds lines {"pred": ..., "ref": ...}.')
@click.option("--grade-timeout", "timeout", type=click.FloatRange(0.1), default=DEFAULT_TIMEOUT, show_default=True,
              help="Seconds allowed per comparison before it counts as a timeout.")
@click.option("--timeout", "old_timeout", type=click.FloatRange(0.1), default=None, hidden=True,
              help="Deprecated spelling of --grade-timeout (elsewhere --timeout is a cell's wall time).")
def grade(file: Path, grader: str, diff: bool, as_json: bool, pairs: bool, timeout: float,
          old_timeout: float | None) -> None:
    """Grade FILE: tora trajectories, ToRA's released outputs, or --pairs of answers."""
    if old_timeout is not None:  # kept one release (0.x) so that scripts keep working; see the README
        click.echo("warning: `tora grade --timeout` is now --grade-timeout (--timeout is a cell's wall time "
                   "elsewhere); the old spelling goes in the next release", err=True)
        timeout = old_timeout
    if pairs:
        if diff:
            raise click.UsageError("--diff applies to trajectory files, not to --pairs")
        _grade_pairs(file, grader, as_json, timeout)
        return
    fmt, items = _load_items(file, grader, timeout)
    summary: dict[str, Any] = {"file": str(file), "format": fmt, "grader": grader, **summarize(items)}
    extra: dict[str, Any] = {}
    released_preds = [i for i in items if i.released_pred is not None]
    if grader == "tora-compat" and released_preds:
        # With ToRA's extraction the predictions should be ToRA's own, row for row.
        extra["pred_mismatches"] = sum(i.pred != i.released_pred for i in released_preds)
    disagreements: list[tuple[ItemGrade, ItemGrade]] = []
    if diff:
        other = next(g for g in GRADERS if g != grader)
        _, other_items = _load_items(file, other, timeout)
        disagreements = [(a, b) for a, b in zip(items, other_items, strict=True) if a.result.correct != b.result.correct]
        other_summary = summarize(other_items)
        extra[f"accuracy_pct ({other})"] = other_summary["accuracy_pct"]
        extra["disagreements"] = len(disagreements)
        summary["accuracy_by_grader"] = {grader: summary["accuracy"], other: other_summary["accuracy"]}
    summary.update({k: v for k, v in extra.items() if not k.startswith("accuracy_pct")})

    if as_json:
        if diff:
            for a, b in disagreements:
                _emit({"id": a.id, "sample_index": a.sample_index, "ref": a.ref, a.result.grader: _item_json(a), b.result.grader: _item_json(b)})
        else:
            for item in items:
                _emit(_item_json(item))
        _emit(summary)
        return
    for a, b in disagreements:
        click.echo(
            f"{a.id}#{a.sample_index}: ref {a.ref!r} | {a.result.grader}: {a.pred!r} -> {_verdict(a)} "
            f"| {b.result.grader}: {b.pred!r} -> {_verdict(b)}"
        )
    _print_summary(f"{file} ({fmt}, {grader})", summary, extra)


def _verdict(item: ItemGrade) -> str:
    if item.result.status != "ok":
        return item.result.status
    return "correct" if item.result.equal else "wrong"
