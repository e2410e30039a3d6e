"""Inline SVG charts for the report (line, histogram, bar): no JavaScript, no external files.
"""

from __future__ import annotations

import html
import math

TRAIN, EVAL, FIRST, LAST, CHOSEN, REJECTED = "#1f6fb4", "#e8731a", "#8a94a3", "#1f6fb4", "#2e9e57", "#c8453b"
W, H = 560, 300  # chart size in SVG user units; the page scales them to its column width
PAD_L, PAD_R, PAD_T, PAD_B = 62, 16, 50, 50



CHANCE = ((0.5, "chance (0.5)"),)  # the reference line of the accuracy charts


AREA_OPACITY = 0.35  # histogram layers: translucent fill, opaque outline


def _nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart; whole
    numbers only if ``integer``, e.g. for steps)."""
    raw = max((hi - lo) / max(n, 1), 1 if integer else 0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and not (integer and m * mag % 1))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–" if v is None else str(v)
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.4g}"


def _range(values: list[float], *, include: tuple[float, ...] = (), pad: float = 0.06) -> tuple[float, float]:
    vals = [v for v in values if v is not None and math.isfinite(v)] + list(include)
    if not vals:
        return 0.0, 1.0
    lo, hi = min(vals), max(vals)
    if hi == lo:
        d = abs(lo) * 0.1 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


class _Frame:
    """Axes, grid, title and legend of one chart; maps data to SVG coordinates."""

    def __init__(self, title: str, xlim, ylim, xlabel: str, ylabel: str, *, xticks=True):
        self.x0, self.x1 = xlim
        self.y0, self.y1 = ylim
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
                      f'aria-label="{html.escape(title)}"><title>{html.escape(title)}</title>',
                      f'<text x="{PAD_L}" y="20" class="title">{html.escape(title)}</text>']
        for t in _nice_ticks(self.y0, self.y1):
            y = self.y(t)
            self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                              f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{fmt(t)}</text>')
        if xticks:
            for t in _nice_ticks(self.x0, self.x1, 6, integer=xticks == "int"):
                x = self.x(t)
                self.parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - PAD_B}" y2="{H - PAD_B + 4}" class="axis"/>'
                                  f'<text x="{x:.1f}" y="{H - PAD_B + 17}" class="tick" text-anchor="middle">{fmt(t)}</text>')
        self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{H - PAD_B}" y2="{H - PAD_B}" class="axis"/>'
                          f'<line x1="{PAD_L}" x2="{PAD_L}" y1="{PAD_T}" y2="{H - PAD_B}" class="axis"/>'
                          f'<text x="{(PAD_L + W - PAD_R) / 2}" y="{H - 8}" class="label" text-anchor="middle">'
                          f'{html.escape(xlabel)}</text>'
                          f'<text x="14" y="{(PAD_T + H - PAD_B) / 2}" class="label" text-anchor="middle" '
                          f'transform="rotate(-90 14 {(PAD_T + H - PAD_B) / 2})">{html.escape(ylabel)}</text>')

    def x(self, v: float) -> float:
        return PAD_L + (v - self.x0) / (self.x1 - self.x0) * (W - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        return H - PAD_B - (v - self.y0) / (self.y1 - self.y0) * (H - PAD_T - PAD_B)

    def legend(self, items: list[tuple[str, str, str]]) -> None:
        """One row under the title: (label, colour, kind), kind being "bar", "area" (a histogram's outlined
        translucent bars), "line", "dashed" (a dashed line with the hollow markers of an eval series) or
        "ref" (a reference line)."""
        x = PAD_L
        for label, color, kind in items:
            if kind in ("bar", "area"):
                area = f' fill-opacity="{AREA_OPACITY}" stroke="{color}" stroke-width="1.4"' if kind == "area" else ""
                swatch = f'<rect x="{x + 2}" y="27" width="12" height="10" fill="{color}"{area}/>'
            else:
                dash = ' stroke-dasharray="4 2.5"' if kind == "dashed" else ""
                swatch = (f'<line x1="{x - 2}" x2="{x + 18}" y1="32" y2="32" stroke="{color}" stroke-width="2.2"{dash}/>'
                          if kind != "ref" else f'<line x1="{x - 2}" x2="{x + 18}" y1="32" y2="32" class="zero"/>')
                if kind == "dashed":
                    swatch += _marker(x + 8, 32, color, hollow=True)
            self.parts.append(f'{swatch}<text x="{x + 23}" y="36" class="tick">{html.escape(label)}</text>')
            x += 38 + 6.2 * len(label)

    def hline(self, v: float) -> None:
        """A dashed reference line across the plot (zero, chance accuracy)."""
        if self.y0 < v < self.y1:
            self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{self.y(v):.1f}" y2="{self.y(v):.1f}" class="zero"/>')

    def svg(self) -> str:
        return "".join(self.parts) + "</svg>"


def _marker(x: float, y: float, color: str, *, hollow: bool = False, tip: str = "") -> str:
    paint = f'r="3.2" fill="#fff" stroke="{color}" stroke-width="1.6"' if hollow else f'r="2.8" fill="{color}"'
    tip = f"<title>{html.escape(tip)}</title>" if tip else ""
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" {paint}>{tip}</circle>'


def line_chart(title: str, series: list[tuple], xlabel: str, ylabel: str,
               ylim: tuple[float, float] | None = None, refs: tuple[tuple[float, str], ...] = ()) -> str:
    """series: (label, colour, xs, ys[, dashed]); a missing or non-finite y breaks the line. A dashed series
    (eval) gets hollow markers on every point, a solid one filled markers if it has at most 40 points.
    refs: (y, label) reference lines."""
    series = [(*s, False) if len(s) == 4 else tuple(s) for s in series]
    xs = [x for _, _, sx, _, _ in series for x in sx]
    frame = _Frame(title, _range(xs, pad=0.02), ylim or _range([y for _, _, _, sy, _ in series for y in sy]), xlabel, ylabel,
                   xticks="int" if all(isinstance(x, int) for x in xs) else True)
    for v, _ in refs:
        frame.hline(v)
    for label, color, sx, sy, dashed in series:
        points = list(zip(sx, sy, strict=True))
        segment: list[str] = []
        segments = []
        for x, y in points:
            if y is None or not math.isfinite(y):
                segments.append(segment)
                segment = []
            else:
                segment.append(f"{frame.x(x):.1f},{frame.y(y):.1f}")
        segments.append(segment)
        for seg in segments:
            if len(seg) > 1:
                dash = ' stroke-dasharray="6 4"' if dashed else ""
                frame.parts.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        if len(points) <= (200 if dashed else 40):
            for x, y in points:
                if y is not None and math.isfinite(y):
                    frame.parts.append(_marker(frame.x(x), frame.y(y), color, hollow=dashed, tip=f"{label} step {x}: {fmt(y)}"))
    frame.legend([(label, color, "dashed" if dashed else "line") for label, color, _, _, dashed in series]
                 + [(label, "", "ref") for _, label in refs])
    return frame.svg()


def histogram_chart(title: str, edges: list[float], series: list[tuple[str, str, list[float]]], xlabel: str,
                    ylabel: str) -> str:
    """Bars over shared bucket edges, one translucent layer per series (label, colour, heights), each
    outlined in its colour so that overlapping layers stay readable."""
    frame = _Frame(title, (edges[0], edges[-1]), _range([v for *_, s in series for v in s], include=(0,)), xlabel, ylabel)
    base = frame.y(0)
    for label, color, heights in series:
        outline = [f"M{frame.x(edges[0]):.1f},{base:.1f}"]
        for lo, hi, v in zip(edges, edges[1:], heights, strict=False):  # n + 1 edges, n heights
            top = frame.y(v)
            outline.append(f"L{frame.x(lo):.1f},{top:.1f}L{frame.x(hi):.1f},{top:.1f}")
            frame.parts.append(f'<rect x="{frame.x(lo):.1f}" y="{min(top, base):.1f}" width="{max(frame.x(hi) - frame.x(lo), 0.5):.1f}" '
                               f'height="{abs(base - top):.1f}" fill="{color}" fill-opacity="{AREA_OPACITY}">'
                               f'<title>{html.escape(label)} [{fmt(lo)}, {fmt(hi)}): {fmt(v)}</title></rect>')
        outline.append(f"L{frame.x(edges[len(heights)]):.1f},{base:.1f}")
        frame.parts.append(f'<path d="{"".join(outline)}" fill="none" stroke="{color}" stroke-width="1.6"/>')
    if edges[0] < 0 < edges[-1]:  # the accuracy boundary: mass right of 0 is counted as a win
        frame.parts.append(f'<line x1="{frame.x(0):.1f}" x2="{frame.x(0):.1f}" y1="{PAD_T}" y2="{H - PAD_B}" class="zero"/>')
    frame.legend([(label, color, "area") for label, color, _ in series])
    return frame.svg()


def bar_chart(title: str, edges: list[str], series: list[tuple[str, str, list[float]]], xlabel: str,
              ylabel: str, ylim: tuple[float, float] | None = None, notes: list[str] | None = None,
              refs: tuple[tuple[float, str], ...] = ()) -> str:
    """Grouped bars over contiguous buckets; ``edges`` (one more than the buckets) label their boundaries,
    ``notes`` (e.g. counts) are printed under each bucket; refs: (y, label) reference lines."""
    count = len(edges) - 1
    values = [v for *_, s in series for v in s]
    frame = _Frame(title, (0, max(count, 1)), ylim or _range(values, include=(0,)), xlabel, ylabel, xticks=False)
    base = frame.y(max(frame.y0, 0))
    slot = frame.x(1) - frame.x(0)
    width = slot * 0.8 / max(len(series), 1)
    every = max(1, math.ceil(max(len(e) for e in edges) * 7 / slot))  # thin the labels until they do not touch
    for i, edge in enumerate(edges):
        frame.parts.append(f'<line x1="{frame.x(i):.1f}" x2="{frame.x(i):.1f}" y1="{H - PAD_B}" y2="{H - PAD_B + 3}" class="axis"/>')
        if i % every == 0:
            frame.parts.append(f'<text x="{frame.x(i):.1f}" y="{H - PAD_B + 15}" class="tick" text-anchor="middle">'
                               f'{html.escape(edge)}</text>')
    for i in range(count):
        name = f"[{edges[i]}, {edges[i + 1]})"
        if notes and every == 1:
            frame.parts.append(f'<text x="{frame.x(i + 0.5):.1f}" y="{H - PAD_B + 28}" class="note" '
                               f'text-anchor="middle">{html.escape(notes[i])}</text>')
        for j, (label, color, vals) in enumerate(series):
            v = vals[i]
            if v is None or not math.isfinite(v):
                continue
            top = frame.y(v)
            note = f" ({notes[i]})" if notes else ""
            frame.parts.append(f'<rect x="{frame.x(i + 0.1) + j * width:.1f}" y="{min(top, base):.1f}" width="{width - 1:.1f}" '
                               f'height="{abs(base - top):.1f}" fill="{color}"><title>{html.escape(label)} {html.escape(name)}: '
                               f'{fmt(v)}{html.escape(note)}</title></rect>')
    for v, _ in ((0.0, ""), *refs):
        frame.hline(v)
    frame.legend([(label, color, "bar") for label, color, _ in series] + [(label, "", "ref") for _, label in refs])
    return frame.svg()
