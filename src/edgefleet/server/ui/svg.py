"""Charts drawn on the server as inline SVG (no JavaScript library, nothing fetched): line charts, bar charts,
the build report's Pareto scatter, a gate's value against its threshold, and a rollout's timeline."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

__all__ = ["Series", "bar_chart", "gate_bar", "line_chart", "pareto_chart", "timeline"]

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")
KIND_COLORS = {"assign": "#2563eb", "done": "#16a34a", "rollback": "#dc2626", "abort": "#dc2626",
               "pause": "#ea580c", "resume": "#0891b2", "hold": "#6b7280", "wait": "#6b7280",
               "aborted": "#dc2626"}


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]
    color: str = PALETTE[0]


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0" if v == 0 else str(v)
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _svg(width: int, height: int, body: list[str], label: str) -> Markup:
    return Markup(f'<svg class="chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
                  f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>')


def _empty(width: int, height: int, label: str) -> Markup:
    return _svg(width, height, [f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">'
                                f'no data yet</text>'], label)


def _span(values: Sequence[float], *, zero: bool = False) -> tuple[float, float]:
    low, high = min(values), max(values)
    if zero:
        low = min(low, 0.0)
    if high - low < 1e-12:
        pad = abs(high) * 0.1 or 1.0
        return low - pad, high + pad
    return low, high + (high - low) * 0.05


def line_chart(series: Sequence[Series], *, label: str, y_unit: str = "", width: int = 640, height: int = 220,
               time_axis: bool = True) -> Markup:
    """Each series as a polyline over a shared x axis (unix seconds when ``time_axis``), with a legend."""
    points = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not points:
        return _empty(width, height, label)
    left, right, top, bottom = 56, 12, 22, 28
    x0, x1 = _span([p[0] for p in points])
    y0, y1 = _span([p[1] for p in points], zero=True)
    sx = (width - left - right) / (x1 - x0)
    sy = (height - top - bottom) / (y1 - y0)

    def xy(x: float, y: float) -> str:
        return f"{left + (x - x0) * sx:.1f},{height - bottom - (y - y0) * sy:.1f}"

    body = [f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
            f'class="plot"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        py = height - bottom - (y - y0) * sy
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>'
                    f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end" class="tick">{_fmt(y)}</text>')
    for i in range(3):
        x = x0 + (x1 - x0) * i / 2
        px = left + (x - x0) * sx
        body.append(f'<text x="{px:.1f}" y="{height - 8}" text-anchor="middle" class="tick">'
                    f'{_clock(x) if time_axis else _fmt(x)}</text>')
    for n, s in enumerate(series):
        pts = [p for p in s.points if math.isfinite(p[1])]
        if not pts:
            continue
        body.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="2" '
                    f'points="{" ".join(xy(x, y) for x, y in pts)}"><title>{escape(s.name)}</title></polyline>')
        if len(pts) == 1:
            x, y = pts[0]
            cx, cy = xy(x, y).split(",")
            body.append(f'<circle cx="{cx}" cy="{cy}" r="3" fill="{s.color}"/>')
        body.append(f'<rect x="{left + 8 + 110 * n}" y="6" width="10" height="10" fill="{s.color}"/>'
                    f'<text x="{left + 22 + 110 * n}" y="15" class="legend">{escape(s.name)}</text>')
    if y_unit:
        body.append(f'<text x="4" y="15" class="tick">{escape(y_unit)}</text>')
    return _svg(width, height, body, label)


def bar_chart(labels: Sequence[str], values: Sequence[float], *, label: str, width: int = 640, height: int = 200,
              color: str = PALETTE[0]) -> Markup:
    """One bar per label, its value written above it."""
    if not values or max(values) <= 0:
        return _empty(width, height, label)
    left, right, top, bottom = 12, 12, 18, 30
    step = (width - left - right) / len(values)
    scale = (height - top - bottom) / max(values)
    body = []
    for i, (name, value) in enumerate(zip(labels, values, strict=True)):
        h = value * scale
        x = left + i * step
        body.append(f'<rect x="{x + step * 0.1:.1f}" y="{height - bottom - h:.1f}" width="{step * 0.8:.1f}" '
                    f'height="{h:.1f}" fill="{color}"><title>{escape(name)}: {_fmt(value)}</title></rect>')
        if len(values) <= 24:
            body.append(f'<text x="{x + step / 2:.1f}" y="{height - bottom - h - 3:.1f}" text-anchor="middle" '
                        f'class="tick">{_fmt(value)}</text>')
        if len(values) <= 24 or i % max(1, len(values) // 10) == 0:
            body.append(f'<text x="{x + step / 2:.1f}" y="{height - 12}" text-anchor="middle" class="tick">'
                        f'{escape(name)}</text>')
    return _svg(width, height, body, label)


def gate_bar(value: float | None, low: float | None, high: float | None, threshold: float, op: str, *,
             label: str, width: int = 320, height: int = 44) -> Markup:
    """A metric's point value and confidence interval on a line, with the gate's threshold marked (red side:
    where the gate trips)."""
    known = [v for v in (value, low, high, threshold) if v is not None and math.isfinite(v)]
    lo, hi = _span(known, zero=True)
    left, right = 10, 10

    def px(v: float) -> float:
        return left + (v - lo) / (hi - lo) * (width - left - right)

    t = px(threshold)
    bad_right = op in (">", ">=")
    zone_x, zone_w = (t, width - right - t) if bad_right else (left, t - left)
    body = [f'<rect x="{zone_x:.1f}" y="8" width="{zone_w:.1f}" height="18" class="tripzone"/>',
            f'<line x1="{left}" x2="{width - right}" y1="17" y2="17" class="axis"/>',
            f'<line x1="{t:.1f}" x2="{t:.1f}" y1="4" y2="30" class="threshold"/>',
            f'<text x="{t:.1f}" y="40" text-anchor="middle" class="tick">{op} {_fmt(threshold)}</text>']
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        body.append(f'<line x1="{px(low):.1f}" x2="{px(high):.1f}" y1="17" y2="17" class="interval"/>')
    if value is not None and math.isfinite(value):
        body.append(f'<circle cx="{px(value):.1f}" cy="17" r="5" class="value"><title>{_fmt(value)}</title></circle>')
    else:
        body.append(f'<text x="{width / 2}" y="14" text-anchor="middle" class="muted">no value yet</text>')
    return _svg(width, height, body, label)


def timeline(start: float, end: float, waves: Sequence[tuple[float, str]], decisions: Sequence[tuple[float, str, str]],
             *, label: str, width: int = 900, height: int = 90) -> Markup:
    """A rollout on a time axis: each wave's start (a band up to the next) and each decision as a coloured tick."""
    end = max(end, start + 1.0)
    left, right = 20, 20

    def px(t: float) -> float:
        return left + (t - start) / (end - start) * (width - left - right)

    body = [f'<line x1="{left}" x2="{width - right}" y1="50" y2="50" class="axis"/>']
    bounds = [w[0] for w in waves] + [end]
    for i, (t, name) in enumerate(waves):
        x, x_next = px(t), px(bounds[i + 1])
        body.append(f'<rect x="{x:.1f}" y="36" width="{max(2.0, x_next - x):.1f}" height="28" '
                    f'fill="{PALETTE[i % len(PALETTE)]}" opacity="0.25"/>'
                    f'<text x="{x + 3:.1f}" y="32" class="tick">{escape(name)}</text>')
    for t, kind, reason in decisions:
        x = px(t)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="38" y2="62" stroke="{KIND_COLORS.get(kind, "#111")}" '
                    f'stroke-width="3"><title>{escape(kind)}: {escape(reason)}</title></line>')
    body.append(f'<text x="{left}" y="82" class="tick">{_clock(start)}</text>'
                f'<text x="{width - right}" y="82" text-anchor="end" class="tick">{_clock(end)}</text>')
    return _svg(width, height, body, label)


def pareto_chart(points: Sequence[tuple[float, float, str, str]], front: Sequence[int], gate: float | None, *,
                 label: str, x_label: str, width: int = 460, height: int = 300) -> Markup:
    """Accuracy (y, %) against a cost (x) for each candidate ``(x, y, name, kind)`` (kind: baseline, chosen,
    passed, failed); the Pareto front joined, the accuracy gate dashed; a log x axis over wide ranges."""
    shown = [i for i, p in enumerate(points) if math.isfinite(p[0]) and p[0] > 0 and math.isfinite(p[1])]
    usable = [points[i] for i in shown]
    if not usable:
        return _empty(width, height, label)
    log = max(p[0] for p in usable) / min(p[0] for p in usable) > 20
    fx = (lambda v: math.log10(v)) if log else (lambda v: v)
    left, right, top, bottom = 48, 14, 14, 40
    x0, x1 = _span([fx(p[0]) for p in usable])
    ys = [p[1] for p in usable] + ([gate] if gate is not None else [])
    y0, y1 = _span(ys)
    y1 = min(y1, 100.5) if y1 > y0 else y1

    def xy(x: float, y: float) -> tuple[float, float]:
        return (left + (fx(x) - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    body = [f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
            f'class="plot"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = xy(usable[0][0], y)
        body.append(f'<text x="{left - 4}" y="{py + 4:.1f}" text-anchor="end" class="tick">{_fmt(y)}</text>')
    for i in range(3):
        v = x0 + (x1 - x0) * i / 2
        px = left + (v - x0) / (x1 - x0) * (width - left - right)
        body.append(f'<text x="{px:.1f}" y="{height - 24}" text-anchor="middle" class="tick">'
                    f'{_fmt(10 ** v if log else v)}</text>')
    body.append(f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" class="tick">{escape(x_label)}'
                f'{" (log)" if log else ""}</text>')
    if gate is not None:
        _, gy = xy(usable[0][0], gate)
        body.append(f'<line x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}" class="gate"/>')
    front_pts = [xy(points[i][0], points[i][1]) for i in front if i in shown]
    if front_pts:
        body.append('<polyline class="front" fill="none" points="'
                    + " ".join(f"{x:.1f},{y:.1f}" for x, y in front_pts) + '"/>')
    for n in shown:  # numbered by their place in ``points`` (the report's table), unmeasured ones left out
        x, y, name, kind = points[n]
        cx, cy = xy(x, y)
        shape = (f'<rect x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" class="pt-{kind}">'
                 if kind == "baseline" else f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5" class="pt-{kind}">')
        close = "</rect>" if kind == "baseline" else "</circle>"
        body.append(f'{shape}<title>{n}: {escape(name)} ({_fmt(x)}, {_fmt(y)}%)</title>{close}'
                    f'<text x="{cx + 6:.1f}" y="{cy - 6:.1f}" class="tick">{n}</text>')
    return _svg(width, height, body, label)
