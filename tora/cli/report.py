"""`tora report RUN_DIR|FILE`: write a self-contained HTML report of the trajectories.

A `tora curate` run folder is reported whole: the run's yield (sampled,
graded correct, kept, and why the rest were not) over every trajectory, each
marked kept or not in the browser.

RUN_DIR/report.html by default (next to FILE for a file: FILE's stem +
.report.html); `--out` names another. Exit: 0 written, 2 usage or bad
records, 1 the file could not be written.
"""

from __future__ import annotations

from pathlib import Path

import click

from tora.cli.output import print_json
from tora.errors import UsageError
from tora.export.source import read, resolve
from tora.report import REPORT, build_report, curation_of
from tora.run_dir import TRAJECTORIES


@click.command("report")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write [default: RUN_DIR/report.html].")
@click.option("--compare-graders", is_flag=True,
              help="Grade every trajectory with every grader and list where they disagree (slower).")
@click.option("--skip-invalid", is_flag=True,
              help="Skip lines that are not valid records (a run killed mid-write leaves a torn last line).")
@click.option("--json", "as_json", is_flag=True,
              help="Print what was written as one JSON line on stdout ({out, source, trajectories}).")
def report(source: Path, out: Path | None, compare_graders: bool, skip_invalid: bool, as_json: bool) -> int:
    """Write an HTML report of RUN_DIR (its curated.jsonl, else trajectories.jsonl) or of FILE."""
    src = resolve(source)
    curation = curation_of(src)
    if curation is not None and src.run_dir is not None:  # every sample, kept or not, and why
        click.echo(f"reading {src.run_dir / TRAJECTORIES} and {src.path}", err=True)
        records = curation.records
    else:
        click.echo(f"reading {src.path}", err=True)
        records = list(read([src.path], skip_invalid=skip_invalid))
    if not records:
        raise UsageError(f"{src.path}: no trajectories to report on")
    if out is None:
        out = src.run_dir / REPORT if src.run_dir is not None else src.path.with_name(f"{src.path.stem}.report.html")
    path = build_report(src, records, out, compare_graders=compare_graders, curation=curation)
    click.echo(f"wrote {path} ({len(records)} trajectories)", err=True)
    if as_json:
        print_json({"out": str(path), "source": str(src.path), "trajectories": len(records)})
    return 0
