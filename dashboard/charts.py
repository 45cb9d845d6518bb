"""Small inline SVG line charts, drawn server-side: the page needs no script and no external asset.

Pure: points in, SVG text out. A chart spans [start, end] in time and 0..max in value; points closer
than a pixel column become one: the line follows each column's last value and a whisker spans its
lowest to highest, so a drop from 3 servers to 2 reads as 3 then 2, never as an average of 2.5 that no
moment had. The line breaks where samples are missing (the dashboard was down), rather than drawing
across the gap. One sample is enough to draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import NamedTuple


class Point(NamedTuple):
    time: float  # unix time the sample starts
    span: float  # seconds it stands for
    value: float
    low: float | None = None  # a column of several samples: the lowest and highest of them
    high: float | None = None


def thin(points: Sequence[Point], start: float, end: float, columns: int) -> list[Point]:
    """At most one point per column of ``(end - start) / columns`` seconds: its last value, with the lowest
    and highest of the column."""
    width = (end - start) / max(1, columns)
    out: list[Point] = []
    group: list[Point] = []
    column = None
    for point in sorted(points):
        key = int((point.time - start) // width) if width > 0 else 0
        if group and key != column:
            out.append(_merge(group))
            group = []
        group.append(point)
        column = key
    if group:
        out.append(_merge(group))
    return out


def _merge(group: list[Point]) -> Point:
    lows = [p.value if p.low is None else p.low for p in group]
    highs = [p.value if p.high is None else p.high for p in group]
    return Point(group[0].time, group[-1].time + group[-1].span - group[0].time, group[-1].value,
                 min(lows), max(highs))


def segments(points: Sequence[Point]) -> list[list[Point]]:
    """Runs of points without a gap: a gap is more than twice the longer sample's span between samples."""
    runs: list[list[Point]] = []
    for point in points:
        if runs:
            last = runs[-1][-1]
            if point.time - (last.time + last.span) <= 2 * max(last.span, point.span, 1e-9):
                runs[-1].append(point)
                continue
        runs.append([point])
    return runs


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def line_chart(points: Sequence[Point], *, start: float, end: float, label: str, width: int = 200,
               height: int = 64, color: str = "#2f7de1") -> str:
    """An SVG of the points over [start, end]; the top of the scale is the highest value (at least 1)."""
    pad_top, pad_bottom = 12, 14
    inner = height - pad_top - pad_bottom
    shown = thin([p for p in points if start <= p.time <= end], start, end, width)
    top = max([1.0, *(p.value if p.high is None else p.high for p in shown)])
    duration = max(end - start, 1e-9)

    right = width - 4  # room for the latest value's dot

    def x(t: float) -> float:
        return round((t - start) / duration * right, 1)

    def y(v: float) -> float:
        return round(pad_top + inner - v / top * inner, 1)

    paths = []
    for run in segments(shown):
        # each sample drawn across the span it stands for, so a lone sample is a visible dash
        coords = []
        for p in run:
            coords.append(f"{x(p.time)},{y(p.value)}")
            coords.append(f"{x(min(p.time + p.span, end))},{y(p.value)}")
        paths.append("M" + " L".join(coords))
    # where a column held other values than its last: a whisker from its lowest to its highest
    whiskers = [f"M{x(p.time + p.span / 2)},{y(p.low)} L{x(p.time + p.span / 2)},{y(p.high)}"
                for p in shown if p.low is not None and p.high is not None and p.low != p.high]
    spread = (f'<path class="range" d="{" ".join(whiskers)}" stroke="{color}" stroke-opacity="0.45" '
              f'stroke-width="3"/>' if whiskers else "")
    # the latest value as a dot: minutes of samples are too narrow to see on a week's scale
    dot = (f'<circle cx="{x(min(shown[-1].time + shown[-1].span, end))}" cy="{y(shown[-1].value)}" r="2.5" '
           f'fill="{color}"/>' if shown else "")
    body = (f'<path d="{" ".join(paths)}" fill="none" stroke="{color}" stroke-width="1.5" '
            f'stroke-linejoin="round"/>{spread}{dot}' if paths else
            f'<text x="{width / 2}" y="{pad_top + inner / 2 + 4}" text-anchor="middle" class="muted">no data yet</text>')
    title = escape(label)
    return (
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{title}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{title}</title>'
        f'<line x1="0" y1="{y(0)}" x2="{width}" y2="{y(0)}" class="axis"/>'
        f'<line x1="0" y1="{y(top)}" x2="{width}" y2="{y(top)}" class="grid"/>'
        f'<text x="2" y="{pad_top - 2}" class="muted">{_number(top)}</text>'
        f'{body}'
        f'<text x="2" y="{height - 2}" class="muted">{escape(_ago(end - start))}</text>'
        f'<text x="{width - 2}" y="{height - 2}" text-anchor="end" class="muted">now</text></svg>'
    )


def _ago(seconds: float) -> str:
    days = seconds / 86400
    if days >= 1:
        return f"-{days:.0f} d"
    hours = seconds / 3600
    return f"-{hours:.0f} h" if hours >= 1 else f"-{seconds / 60:.0f} min"
