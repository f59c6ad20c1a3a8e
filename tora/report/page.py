"""The report page: one self-contained HTML file.

Everything is inline (CSS, SVG charts, one script), and a Content Security
Policy forbids every fetch, so nothing reaches the network when the file is
opened. Model text is hostile: the charts and tables are built here with
every string escaped, and the trajectories travel as JSON inside a
`<script type="application/json">` element with `<`, `>` and `&` written as
`\\u003c` ... so no record can close the element; the browser's script turns
them into DOM nodes with `textContent` only, and the policy allows that one
script (by its hash), so even injected markup could not run code.

The trajectory browser renders lazily: a page of the list at a time, one
trajectory's steps when it is opened.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from tora.export.view import error_view, question_text, review_turns
from tora.record import Trajectory
from tora.report.charts import BLUE, GREEN, GREY, RED, Bar, columns, hbars, stacked
from tora.report.curation import KEPT, CurationRun
from tora.report.summary import Summary, verdict_label

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
MAX_FIELD = 20_000  # characters of one string kept in the page (outputs are already capped by the sandbox)
MAX_TRACEBACK = 4_000
MAX_LISTED = 500  # rows of the grading tables


def _asset(name: str) -> str:
    return resources.files("tora.report").joinpath(name).read_text(encoding="utf-8")


def _cap(text: str | None, limit: int = MAX_FIELD) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"\n… [{len(text) - limit} more characters not shown]"


def _turns(t: Trajectory) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for turn in review_turns(t):
        item: dict[str, Any] = {"p": _cap(turn.text)}
        if turn.code is not None:
            item["code"] = _cap(turn.code)
            item["st"], item["out"] = "not run", ""
        ex = turn.execution
        if ex is not None:
            item["st"], item["out"] = ex.status, _cap(ex.rendered)
            if ex.error is not None:
                item["en"], item["ev"] = ex.error.ename, _cap(ex.error.evalue, MAX_TRACEBACK)
                item["tb"] = _cap(_ANSI.sub("", "\n".join(ex.error.traceback)), MAX_TRACEBACK)
        out.append(item)
    return out


def browser_rows(records: Sequence[Trajectory], summary: Summary,
                 curation: CurationRun | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for i, t in enumerate(records):
        err = error_view(t)
        row: dict[str, Any] = {
            "pid": t.problem.id, "k": t.sample_index, "q": _cap(question_text(t)), "ref": t.problem.answer,
            "pred": t.result.final_answer, "c": t.result.correct, "gs": t.result.grade_status,
            "fin": t.result.finish, "origin": t.origin, "tc": sum(1 for s in t.steps if s.type == "execution"),
            "ee": sum(1 for s in t.steps if s.type == "execution" and s.status != "ok"),
            "turns": _turns(t),
        }
        if err is not None:
            row["err"], row["ek"] = _cap(err.message, MAX_TRACEBACK), err.kind
        if i in summary.verdicts:
            row["v"] = [[v.grader, verdict_label(v.correct, v.status), v.pred] for v in summary.verdicts[i]]
        if curation is not None:
            row["why"] = curation.why[i]
        rows.append(row)
    return rows


def safe_json(data: Any) -> str:
    """JSON that cannot end the <script> element it sits in, nor open a comment in it."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _section(title: str, body: str, sid: str = "") -> str:
    anchor = f' id="{sid}"' if sid else ""
    return f'<section{anchor}><h2>{escape(title)}</h2>{body}</section>'


def _group_chart(groups: dict[str, dict[str, Any]], title: str) -> str:
    bars = [Bar(name, g["accuracy"] or 0.0, f"{_pct(g['accuracy'])}  ({g['correct']}/{g['n']})", GREEN)
            for name, g in groups.items()]
    return hbars(bars, maximum=1.0, title=title)


def _count_chart(counts: dict[str, int], title: str, color: str = BLUE, top: int = 15) -> str:
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    if not items:
        return f'<p class="muted">{escape(title)}: none</p>'
    return hbars([Bar(k, v, str(v), color) for k, v in items], title=title)


def _link(i: int, t: Trajectory) -> str:
    return f'<a href="#t={i}">{escape(t.problem.id)}#{t.sample_index}</a>'


def _grading(records: Sequence[Trajectory], s: Summary) -> str:
    parts = [_count_chart(s.metrics.get("grade_status", {}), "grade status (recorded)")]
    if s.ungraded:
        rows = "".join(
            f"<tr><td>{_link(i, records[i])}</td><td>{escape(records[i].result.grade_status or 'ungraded')}</td>"
            f"<td><code>{escape(str(records[i].result.final_answer))}</code></td>"
            f"<td><code>{escape(str(records[i].problem.answer))}</code></td></tr>"
            for i in s.ungraded[:MAX_LISTED])
        parts.append(f"<h3>Ungraded ({len(s.ungraded)}): no verdict, neither right nor wrong</h3>"
                     f"<table><tr><th>trajectory</th><th>status</th><th>answer</th><th>reference</th></tr>{rows}</table>")
    if s.verdicts:
        head = "".join(f"<th>{escape(g)}</th>" for g in s.graders)
        rows = "".join(
            f"<tr><td>{_link(i, records[i])}</td><td><code>{escape(str(records[i].problem.answer))}</code></td>"
            + "".join(f"<td>{escape(verdict_label(v.correct, v.status))}: <code>{escape(str(v.pred))}</code></td>"
                      for v in s.verdicts[i]) + "</tr>"
            for i in s.disagreements[:MAX_LISTED])
        parts.append(f"<h3>Graders disagree on {len(s.disagreements)} of {len(records)}</h3>"
                     + (f"<table><tr><th>trajectory</th><th>reference</th>{head}</tr>{rows}</table>" if rows else ""))
    else:
        parts.append('<p class="muted">One verdict per trajectory was recorded; <code>tora report --compare-graders'
                     "</code> grades with every grader and lists the disagreements.</p>")
    return "".join(parts)


def summary_html(records: Sequence[Trajectory], s: Summary) -> str:
    m = s.metrics
    n = len(records)
    correct = m["correct"]
    ungraded = len(s.ungraded)
    overall = (f'<p class="big">{_pct(m["accuracy"])} <span class="muted">({correct} of {n} correct)</span></p>'
               + stacked([("correct", correct, GREEN), ("wrong", n - correct - ungraded, RED),
                          ("ungraded", ungraded, GREY)]))
    if m.get("maj_at_k") is not None:
        mean = f'pass@1 (mean of {m["samples"]}) {_pct(m["pass_at_1"])} · ' if m.get("pass_at_1") is not None else ""
        overall += f'<p>{mean}maj@{m["samples"]} {_pct(m["maj_at_k"])} · pass@{m["samples"]} {_pct(m["pass_at_k"])}</p>'
    groups = "".join(_group_chart(m[key], f"accuracy by {key[3:]}") for key in ("by_type", "by_level") if key in m)
    hist = columns([(str(k), s.tool_calls[k]) for k in range(max(s.tool_calls, default=0) + 1)],
                   title="tool calls per trajectory")
    cells = (_count_chart(dict(s.cell_status), "cell status", BLUE) + _count_chart(dict(s.enames), "exceptions (ename)", RED)
             + (_count_chart(dict(s.error_kinds), "trajectory errors (kind)", RED) if s.error_kinds else ""))
    return "".join([
        _section("Accuracy", overall + (f'<div class="row">{groups}</div>' if groups else ""), "accuracy"),
        _section("How trajectories ended", f'<div class="row">{_count_chart(m["finish"], "finish reason")}{hist}</div>'),
        _section("Code cells", f'<div class="row">{cells}</div>'),
        _section("Grading", _grading(records, s), "grading"),
    ])


_YIELD_COLORS = {KEPT: GREEN, "failed": GREY, "wrong": RED, "tool error": "#ef6c00", "duplicate": BLUE,
                 "over the cap": "#6a1b9a", "not final yet": "#bdbdbd"}


def yield_html(curation: CurationRun) -> str:
    """sampled -> graded correct -> kept, and why the rest were not."""
    c = curation.yield_counts()
    n = c["sampled"]
    lead = (f'<p class="big">{c[KEPT]} kept <span class="muted">of {n} sampled ({c["correct"]} graded correct'
            + (f"; {c['corrections kept']} teacher corrections kept too" if c["corrections kept"] else "")
            + (f"; {c['contaminated problems']} problems excluded as contaminated, not sampled"
               if c["contaminated problems"] else "") + ")</span></p>")
    bar = stacked([(name, c[name], color) for name, color in _YIELD_COLORS.items() if c[name]])
    rows = "".join(f"<tr><td>{escape(name)}</td><td>{c[name]}</td></tr>"
                   for name in ("sampled", "correct", *_YIELD_COLORS, "corrections kept", "contaminated problems"))
    note = ('<p class="muted">The browser below holds every trajectory of the run; the <em>kept</em> filter shows '
            "the curated ones.</p>")
    return _section("Curation yield", lead + bar + f"<table>{rows}</table>" + note, "yield")


def _header(source: Path, manifest: dict[str, Any] | None, n: int, graders: list[str]) -> str:
    facts = [("records", str(source)), ("trajectories", str(n)), ("graders", ", ".join(graders) or "none")]
    if manifest:
        dataset = manifest.get("dataset")
        facts += [("model", str(manifest.get("model", ""))),
                  ("dataset", str(dataset.get("name", "")) if isinstance(dataset, dict) else str(dataset or "")),
                  ("run", str(manifest.get("run_id", "")))]
    facts.append(("generated", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")))
    items = "".join(f"<div><dt>{escape(k)}</dt><dd>{escape(v)}</dd></div>" for k, v in facts if v)
    return f"<dl class=\"facts\">{items}</dl>"


def render(records: Sequence[Trajectory], summary: Summary, *, source: Path, title: str,
           manifest: dict[str, Any] | None, curation: CurationRun | None = None) -> str:
    script = _asset("report.js")
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{digest}'; img-src data:"
    replacements = {
        "<!--csp-->": escape(csp),
        "<!--title-->": escape(title),
        "<!--css-->": _asset("report.css"),
        "<!--header-->": _header(source, manifest, len(records), summary.graders),
        "<!--summary-->": (yield_html(curation) if curation else "") + summary_html(records, summary),
        "<!--data-->": safe_json({"t": browser_rows(records, summary, curation)}),
        "<!--script-->": script,
    }
    page = _asset("template.html")
    # One pass, so text inserted for one marker is never searched for another.
    return re.sub("|".join(re.escape(k) for k in replacements), lambda m: replacements[m.group(0)], page)
