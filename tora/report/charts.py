"""Inline SVG bar charts, drawn here so the page shows them with no script
and no network. Every label is escaped: type names and exception names come
from the data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

GREEN, RED, GREY, BLUE = "#2e7d32", "#c62828", "#9e9e9e", "#1f5fa8"
_FONT = 'font-family="system-ui, sans-serif" font-size="12"'


@dataclass(frozen=True)
class Bar:
    label: str
    value: float  # bar length, against the chart's maximum
    text: str  # shown after the bar
    color: str = BLUE


def _clip(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def hbars(bars: Sequence[Bar], *, maximum: float | None = None, title: str = "") -> str:
    """One horizontal bar per row, label on the left, figure on the right."""
    label_w, bar_w, row_h, text_w = 170, 320, 22, 110
    top = 22 if title else 4
    height = top + row_h * len(bars) + 6
    width = label_w + bar_w + text_w
    most = maximum if maximum is not None else max((b.value for b in bars), default=0) or 1
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" {_FONT}>']
    if title:
        out.append(f'<text x="0" y="14" font-weight="600">{escape(title)}</text>')
    for n, bar in enumerate(bars):
        y = top + n * row_h
        # A non-zero value keeps at least a sliver, so it never reads as zero.
        length = max(1.0, bar_w * min(bar.value, most) / most) if bar.value > 0 else 0.0
        out.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end">{escape(_clip(bar.label))}</text>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{bar_w}" height="{row_h - 6}" fill="#eef1f5"/>')
        out.append(f'<rect x="{label_w}" y="{y + 3}" width="{length:.1f}" height="{row_h - 6}" fill="{bar.color}">'
                   f'<title>{escape(bar.label)}: {escape(bar.text)}</title></rect>')
        out.append(f'<text x="{label_w + bar_w + 6}" y="{y + 15}">{escape(bar.text)}</text>')
    out.append("</svg>")
    return "".join(out)


def columns(counts: Sequence[tuple[str, int]], *, title: str = "", color: str = BLUE) -> str:
    """A histogram: one column per (label, count)."""
    col_w, plot_h, top, bottom = 34, 140, 36 if title else 18, 34  # room for the count above the tallest
    width = max(col_w * len(counts) + 20, 200)
    height = top + plot_h + bottom
    most = max((c for _, c in counts), default=0) or 1
    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" {_FONT}>']
    if title:
        out.append(f'<text x="0" y="14" font-weight="600">{escape(title)}</text>')
    base = top + plot_h
    out.append(f'<line x1="6" y1="{base}" x2="{width - 6}" y2="{base}" stroke="#888"/>')
    for n, (label, count) in enumerate(counts):
        x = 10 + n * col_w
        h = plot_h * count / most
        out.append(f'<rect x="{x}" y="{base - h:.1f}" width="{col_w - 8}" height="{h:.1f}" fill="{color}">'
                   f'<title>{escape(label)}: {count}</title></rect>')
        out.append(f'<text x="{x + (col_w - 8) / 2}" y="{base + 14}" text-anchor="middle">{escape(label)}</text>')
        out.append(f'<text x="{x + (col_w - 8) / 2}" y="{base - h - 3:.1f}" text-anchor="middle" '
                   f'font-size="10">{count}</text>')
    out.append("</svg>")
    return "".join(out)


def stacked(parts: Sequence[tuple[str, int, str]], *, width: int = 600) -> str:
    """One bar split into (label, count, color) parts, with a legend under it."""
    total = sum(c for _, c, _ in parts) or 1
    out = [f'<svg class="chart" role="img" width="{width}" height="52" viewBox="0 0 {width} 52" {_FONT}>']
    x = 0.0
    for label, count, color in parts:
        w = width * count / total
        if w > 0:
            out.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="24" fill="{color}">'
                       f'<title>{escape(label)}: {count}</title></rect>')
        x += w
    lx = 0
    for label, count, color in parts:
        out.append(f'<rect x="{lx}" y="34" width="12" height="12" fill="{color}"/>')
        text = f"{label} {count}"
        out.append(f'<text x="{lx + 16}" y="45">{escape(text)}</text>')
        lx += 30 + 8 * len(text)
    out.append("</svg>")
    return "".join(out)
