"""`tora export RUN_DIR|FILE --format F`: training and review formats from records.

JSONL formats go to stdout unless `--out FILE`; `ipynb` (a folder of
notebooks) and `parquet` (a file) need `--out`. What was read, written and
left out is said on stderr. Exit: 0 done (also when nothing matched), 2 usage
or bad records, 1 a file could not be written.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click

from tora.errors import RecordError, UsageError
from tora.export import FILE_FORMATS, FORMATS, ROW_FORMATS, Selection, Tally, select
from tora.export.formats import ROWS, tora_row
from tora.export.pairs import CorrectionStats, correction_rows, preference_rows
from tora.export.source import Source, read, resolve
from tora.record import Trajectory


def _rows(fmt: str, records: Sequence[Trajectory], source: Source, opts: dict[str, Any],
          tally: Tally) -> Iterator[dict[str, Any]]:
    if fmt == "preference":
        yield from preference_rows(records, seed=opts["seed"], per_problem=opts["pairs_per_problem"])
    elif fmt == "correction":
        stats = CorrectionStats()
        extra = [*source.others, *opts["parents"]]
        parents = list(read(extra, skip_invalid=opts["skip_invalid"]))
        yield from correction_rows(records, parents, stats)
        if stats.missing_parent:
            tally.notes.append(f"{len(stats.missing_parent)} corrections without their parent among the records "
                               f"(first: {stats.missing_parent[0]}; add --parents FILE)")
        if stats.inconsistent:
            tally.notes.append(f"{len(stats.inconsistent)} corrections whose prefix_lines do not match their "
                               f"parent (first: {stats.inconsistent[0]})")
    elif fmt == "rl":
        yield from _rl_rows(records, opts, tally)
    else:
        build: Callable[[Trajectory], dict[str, Any]] = (
            functools.partial(tora_row, spans=True) if fmt == "tora" and opts["output_spans"] else ROWS[fmt]
        )
        for t in records:
            yield build(t)


def _rl_rows(records: Sequence[Trajectory], opts: dict[str, Any], tally: Tally) -> Iterator[dict[str, Any]]:
    from tora.export.rl import RewardRule, retokenize, rl_row

    rule = RewardRule.parse(opts["reward"])
    tokenizer, name = None, None
    if opts["retokenize"] is not None:
        tokenizer, name = _tokenizer(opts["retokenize"]), opts["retokenize"].name
    no_tokens: list[str] = []
    ungraded: list[str] = []
    for t in records:
        row = rl_row(t, rule)
        if row is None and tokenizer is not None:
            row = rl_row(retokenize(t, tokenizer), rule, retokenized_with=name)
        if row is None:
            no_tokens.append(t.id)
        elif row.reward is None:
            ungraded.append(t.id)
        else:
            yield row.model_dump()
    if no_tokens:
        tally.notes.append(f"{len(no_tokens)} records without tokens left out (text path, replay or before schema "
                           f"1.2; first: {no_tokens[0]}); --retokenize TOKENIZER_DIR re-tokenises them, marked in the row")
    if ungraded:
        tally.notes.append(f"{len(ungraded)} ungraded records left out: no reward (first: {ungraded[0]}; "
                           "run tora grade first)")


def _tokenizer(folder: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ModuleNotFoundError as exc:
        raise UsageError("--retokenize needs transformers: pip install 'tora-tir[hf]'") from exc
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise UsageError(f"--retokenize {folder}: not a tokenizer folder ({type(exc).__name__}: {exc})") from exc


def _say(tally: Tally, written: int, what: str, where: str) -> None:
    left = [f"{n} {label}" for n, label in ((tally.failed, "failed (error/interrupted; --include-failed keeps them)"),
                                             (tally.filtered, "filtered out"), (tally.duplicates, "duplicates"))
            if n]
    if written == 1:
        what = what[:-1]
    click.echo(f"wrote {written} {what} to {where}" + (f"; left out: {', '.join(left)}" if left else ""), err=True)
    for note in tally.notes:
        click.echo(f"note: {note}", err=True)


@click.command("export")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--format", "-f", "fmt", type=click.Choice(FORMATS), required=True, help="Output format.")
@click.option("--out", "-o", type=click.Path(path_type=Path), default=None,
              help="Output file (a folder for ipynb) [JSONL formats: stdout].")
@click.option("--only-correct", is_flag=True, help="Only trajectories graded correct.")
@click.option("--finish", "finishes", multiple=True,
              type=click.Choice(["answered", "no_answer", "max_tool_calls", "max_tokens", "error", "interrupted"]),
              help="Only trajectories that ended this way (repeatable).")
@click.option("--include-failed", is_flag=True,
              help="Keep trajectories that ended in error or were interrupted (ipynb always keeps them).")
@click.option("--dedupe", is_flag=True, help="Keep the first trajectory of each content_hash.")
@click.option("--limit", "-n", type=click.IntRange(1), default=None, help="Only the first N selected trajectories.")
@click.option("--output-spans", is_flag=True,
              help="tora: add output_spans, the character spans of the ```output blocks in the assistant text.")
@click.option("--rows", "rows_fmt", type=click.Choice(ROW_FORMATS), default="trl", show_default=True,
              help="parquet: which format's rows the file holds.")
@click.option("--seed", type=int, default=0, show_default=True, help="preference: seed of the pairing.")
@click.option("--pairs-per-problem", type=click.IntRange(1), default=1, show_default=True,
              help="preference: at most this many (chosen, rejected) pairs per problem.")
@click.option("--parents", type=click.Path(dir_okay=False, exists=True, path_type=Path), multiple=True,
              help="correction: another records file holding the parents (a run folder's other file is read anyway).")
@click.option("--reward", default=None, metavar="NAME=VALUE,...",
              help="rl: the reward rule, over correct=1,wrong=0; terms added when they apply: no_answer, "
                   "tool_error (per failed cell), truncated (e.g. no_answer=-0.5,tool_error=-0.1).")
@click.option("--retokenize", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              metavar="TOKENIZER_DIR",
              help="rl: tokenise records that carry no tokens with this tokenizer (marked in the row) "
                   "instead of leaving them out.")
@click.option("--skip-invalid", is_flag=True,
              help="Skip lines that are not valid records (a run killed mid-write leaves a torn last line).")
def export(source: Path, fmt: str, out: Path | None, only_correct: bool, finishes: tuple[str, ...],
           include_failed: bool, dedupe: bool, limit: int | None, **opts: Any) -> int:
    """Export the trajectories of RUN_DIR (its curated.jsonl, else trajectories.jsonl) or FILE."""
    if fmt in FILE_FORMATS and out is None:
        raise UsageError(f"--format {fmt} writes {'a folder of notebooks' if fmt == 'ipynb' else 'a file'}: "
                         "give it with --out PATH")
    pairs = opts["rows_fmt"] if fmt == "parquet" else fmt
    if pairs in ("preference", "correction") and only_correct:
        raise UsageError(f"--only-correct leaves no wrong trajectory for --format {pairs}")
    if pairs == "rl":
        from tora.export.rl import RewardRule

        RewardRule.parse(opts["reward"])  # a bad rule fails before anything is read
    src = resolve(source)
    if src.run_dir is not None:
        click.echo(f"reading {src.path}", err=True)
    sel = Selection(only_correct=only_correct, include_failed=include_failed or fmt == "ipynb"
                    or pairs in ("preference", "correction"), finishes=finishes, dedupe=dedupe, limit=limit)
    tally = Tally()
    records = select(read([src.path], skip_invalid=opts["skip_invalid"]), sel, tally)
    if fmt == "ipynb":
        assert out is not None
        _write_notebooks(records, out)
        _say(tally, len(records), "notebooks", str(out))
        return 0
    from tora.export.writers import write_jsonl, write_parquet

    rows = _rows(pairs, records, src, opts, tally)
    what = "pairs" if pairs in ("preference", "correction") else "rows"
    if fmt == "parquet":
        assert out is not None
        written = write_parquet(list(rows), out)
    else:
        written = write_jsonl(rows, out)
    _say(tally, written, what, str(out) if out else "stdout")
    return 0


def _write_notebooks(records: Sequence[Trajectory], folder: Path) -> None:
    from tora.export.notebook import write_notebook

    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {folder}: ipynb writes a folder of notebooks, and this is a file")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RecordError(f"cannot create {folder}: {exc.strerror}") from exc
    for t in records:
        write_notebook(t, folder)
