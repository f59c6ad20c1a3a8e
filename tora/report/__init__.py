"""`tora report`: one self-contained HTML page about a run's trajectories.

`summary` computes the figures (from the records alone), `charts` draws them
as inline SVG, `page` assembles the file from `template.html`, `report.css`
and `report.js` (shipped with the package) and the records as safe JSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tora.errors import DataError, RecordError
from tora.export.source import Source
from tora.record import Trajectory
from tora.report.curation import CurationRun, read_curation
from tora.report.page import render
from tora.report.summary import summarize
from tora.run_dir import read_manifest

REPORT = "report.html"


def _manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest for the page's header; a broken one is left out, not fatal (the report only reads)."""
    try:
        return read_manifest(run_dir, required=())
    except DataError:
        return None


def curation_of(source: Source) -> CurationRun | None:
    """A curation run folder's every trajectory and why each was or was not kept; None for anything else."""
    if source.run_dir is None:
        return None
    return read_curation(source.run_dir, _manifest(source.run_dir))


def build_report(source: Source, records: list[Trajectory], out: Path, *, compare_graders: bool = False,
                 curation: CurationRun | None = None) -> Path:
    summary = summarize(records, compare_graders=compare_graders)
    manifest = _manifest(source.run_dir) if source.run_dir is not None else None
    name = source.run_dir.name if source.run_dir is not None else source.path.name
    html = render(records, summary, source=source.path, title=f"tora report: {name}", manifest=manifest,
                  curation=curation)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        # errors="replace": a lone surrogate in a record (valid JSON, not UTF-8) is written as "?".
        tmp.write_text(html, encoding="utf-8", errors="replace")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RecordError(f"cannot write {out}: {exc.strerror}") from exc
    return out
