"""A self-contained HTML report of one run: curves, margin histograms, length bias, evals.

Everything comes from the named queries in ``sql/`` (via :mod:`prefcache.analysis.views`); the charts are
inline SVG drawn here, so the page needs no JavaScript, no network and no plotting library.
"""

from __future__ import annotations

import html
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path

from prefcache.analysis.views import AnalysisError, connect
from prefcache.core.atomic import write_text_atomic

TRAIN, EVAL, FIRST, LAST, CHOSEN, REJECTED = "#1f6fb4", "#e8731a", "#8a94a3", "#1f6fb4", "#2e9e57", "#c8453b"
CHANCE = ((0.5, "chance (0.5)"),)  # the reference line of the accuracy charts
AREA_OPACITY = 0.35  # histogram layers: translucent fill, opaque outline
W, H = 560, 300  # chart size in SVG user units; the page scales them to its column width
PAD_L, PAD_R, PAD_T, PAD_B = 62, 16, 50, 50


# ---------------------------------------------------------------------------------------------------------
# Small SVG charts.

def _nice_ticks(lo: float, hi: float, n: int = 5, *, integer: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2, 2.5 or 5 times a power of ten apart; whole
    numbers only if ``integer``, e.g. for steps)."""
    raw = max((hi - lo) / max(n, 1), 1 if integer else 0)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and not (integer and m * mag % 1))
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float | None) -> str:
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
                              f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{_fmt(t)}</text>')
        if xticks:
            for t in _nice_ticks(self.x0, self.x1, 6, integer=xticks == "int"):
                x = self.x(t)
                self.parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{H - PAD_B}" y2="{H - PAD_B + 4}" class="axis"/>'
                                  f'<text x="{x:.1f}" y="{H - PAD_B + 17}" class="tick" text-anchor="middle">{_fmt(t)}</text>')
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
                    frame.parts.append(_marker(frame.x(x), frame.y(y), color, hollow=dashed, tip=f"{label} step {x}: {_fmt(y)}"))
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
                               f'<title>{html.escape(label)} [{_fmt(lo)}, {_fmt(hi)}): {_fmt(v)}</title></rect>')
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
                               f'{_fmt(v)}{html.escape(note)}</title></rect>')
    for v, _ in ((0.0, ""), *refs):
        frame.hline(v)
    frame.legend([(label, color, "bar") for label, color, _ in series] + [(label, "", "ref") for _, label in refs])
    return frame.svg()


# ---------------------------------------------------------------------------------------------------------
# The report.

def _table(df, columns: list[str] | None = None, max_chars: int = 160, tail: tuple[str, ...] = ()) -> str:
    """An HTML table; long texts are cut to ``max_chars``, keeping their end in the ``tail`` columns (a
    prompt's question comes last, after the template's system prompt)."""
    columns = columns or df.columns
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in df.select(columns).iter_rows():
        cells = []
        for name, v in zip(columns, row, strict=True):
            text = _fmt(v) if isinstance(v, float) and math.isfinite(v) else ("" if v is None else str(v))
            if len(text) > max_chars:
                text = "…" + text[-max_chars:] if name in tail else text[:max_chars] + "…"
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _curves(db) -> list[str]:
    if not db.views.get("steps"):
        return ['<p class="empty">No step logs (logs/steps-*.parquet).</p>']
    df = db.query("training_curves")
    charts = []
    for column, title, ylim in (("loss", "Loss", None), ("accuracy", "Reward accuracy", (0.0, 1.0)),
                                ("margin", "Reward margin (chosen − rejected)", None)):
        series = []
        for split, color in (("train", TRAIN), ("eval", EVAL)):
            part = df.filter(df["split"] == split)
            if len(part):
                series.append((split, color, part["step"].to_list(), part[column].to_list(), split == "eval"))
        if series:
            charts.append(line_chart(title, series, "step", column, ylim, CHANCE if column == "accuracy" else ()))
    rewards = []
    for split, dashed in (("train", False), ("eval", True)):
        part = df.filter(df["split"] == split)
        if len(part):
            rewards += [(f"{split} chosen", CHOSEN, part["step"].to_list(), part["rewards_chosen"].to_list(), dashed),
                        (f"{split} rejected", REJECTED, part["step"].to_list(), part["rewards_rejected"].to_list(), dashed)]
    if rewards:
        charts.append(line_chart("Mean implicit rewards", rewards, "step", "reward"))
    return charts


def _split_with_examples(db) -> str | None:
    if not db.views.get("examples"):
        return None
    # The split with the most pairs at its last logged step, held-out ones first on a tie: a train step
    # logs one batch (4 pairs by default), an eval step every held-out pair.
    sizes = db.sql("SELECT split, count(*) AS n FROM examples WHERE (split, step) IN "
                   "(SELECT (split, max(step)) FROM examples GROUP BY split) GROUP BY split")
    n = dict(sizes.iter_rows())
    order = [s for s in ("eval", "score", "train") if s in n] + sorted(s for s in n if s not in ("eval", "score", "train"))
    return max(order, key=lambda s: (n[s], -order.index(s))) if order else None


def _histograms(db, split: str) -> list[str]:
    span = db.sql("SELECT min(step) AS first, max(step) AS last FROM examples WHERE split = $split", split=split)
    first, last = span.row(0)
    # per step: finite margins, the rest (NaN, inf, null: a diverged step), and the share of wins
    stats = db.sql("SELECT step, count(*) FILTER (WHERE isfinite(margin)) AS n, "
                   "count(*) FILTER (WHERE margin IS NULL OR NOT isfinite(margin)) AS bad, "
                   "avg(CASE WHEN margin > 0 THEN 1.0 ELSE 0.0 END) FILTER (WHERE isfinite(margin)) AS win, "
                   "min(margin) FILTER (WHERE isfinite(margin)) AS lo, max(margin) FILTER (WHERE isfinite(margin)) AS hi "
                   "FROM examples WHERE split = $split AND step IN ($first, $last) GROUP BY step ORDER BY step",
                   split=split, first=first, last=last)
    los, his = [v for v in stats["lo"] if v is not None], [v for v in stats["hi"] if v is not None]
    if not los:
        return []
    lo, hi = min(los), max(his)
    if hi <= lo:  # every margin equal (one pair, or a policy still equal to the reference)
        lo, hi = lo - 0.5, hi + 0.5
    series, edges, skipped = [], None, []
    for (step, n, bad, win, *_), color in zip(stats.iter_rows(), (FIRST, LAST) if len(stats) == 2 else (LAST,), strict=True):
        label = f"step {step}"
        if not n:
            skipped.append(f"{label}: all {bad:,} margin{'s' * (bad != 1)} NaN/inf")
            continue
        try:
            h = db.query("margin_histogram", step=str(step), split=split, bins=30, lo=repr(lo), hi=repr(hi))
        except AnalysisError:  # margin_histogram cannot bucket an infinite margin
            skipped.append(f"{label}: not drawn, {bad:,} margin{'s' * (bad != 1)} NaN/inf")
            continue
        edges = h["bucket_lo"].to_list() + [h["bucket_hi"][-1]]
        extra = f", {bad:,} NaN/inf left out" if bad else ""
        series.append((f"{label} (n={n:,}, {win:.0%} > 0{extra})", color, h["fraction"].to_list()))
    if not series:
        return [f'<p class="empty">Reward margins ({split}): {html.escape("; ".join(skipped))}.</p>']
    xlabel = "margin" + (f" ({'; '.join(skipped)})" if skipped else "")
    return [histogram_chart(f"Reward margins ({split}), first and last logged step", edges, series, xlabel, "fraction of pairs")]


def _length_bias(db, split: str) -> list[str]:
    q = db.sql("SELECT quantile_cont(chosen_tokens - rejected_tokens, 0.05) AS lo, "
               "quantile_cont(chosen_tokens - rejected_tokens, 0.95) AS hi FROM examples WHERE split = $split "
               "AND step = (SELECT max(step) FROM examples WHERE split = $split)", split=split)
    lo, hi = q.row(0)
    if lo is None:
        return []
    width = max(1, int(_nice_ticks(0, max(hi - lo, 1), 8)[1]))  # a round width giving ~8 buckets
    df = db.query("length_bias", split=split, width=width)
    rows, total, step = {r["bucket_lo"]: r for r in df.to_dicts()}, int(df["n"].sum()), df["step"][0]
    # Buckets holding <1% of pairs are noise on a bar chart, so the sparse ends are trimmed; the query lists
    # only buckets that hold pairs, so the empty ones in between are put back (the bars must line up with the axis).
    lows = [b for b, r in rows.items() if r["share"] >= 0.01] or list(rows)
    buckets = range(min(lows), max(lows) + width, width)
    kept = [rows.get(b, {"n": 0}) for b in buckets]
    dropped = total - sum(r["n"] for r in kept)
    edges = [str(b) for b in buckets] + [str(buckets[-1] + width)]
    notes = [f"n={r['n']}" for r in kept]
    xlabel = "chosen − rejected tokens" + (f" ({dropped} pairs in the sparse ends not shown)" if dropped else "")
    return [
        bar_chart(f"Accuracy by length difference ({split}, step {step})", edges,
                  [("accuracy", TRAIN, [r.get("accuracy") for r in kept])], xlabel, "accuracy", (0.0, 1.0), notes, CHANCE),
        bar_chart(f"Mean reward by length difference ({split}, step {step})", edges,
                  [("chosen", CHOSEN, [r.get("reward_chosen") for r in kept]),
                   ("rejected", REJECTED, [r.get("reward_rejected") for r in kept])], xlabel, "mean reward", None, notes),
    ]


def _settings(run: dict) -> list[tuple[str, str]]:
    """The run's settings a reader needs to interpret the curves, from run.json."""
    cfg = run.get("config") if isinstance(run.get("config"), dict) else {}
    cache = run.get("cache") if isinstance(run.get("cache"), dict) else {}
    policy = run.get("policy") if isinstance(run.get("policy"), dict) else {}
    loss = cfg.get("loss")
    rows = [("model", policy.get("model_name") or cfg.get("model") or "(embedded default)"),
            ("finetune", cfg.get("finetune")),
            ("loss", ",".join(loss) if isinstance(loss, list) else loss),
            ("beta", cfg.get("beta")), ("lr", cfg.get("lr")), ("scheduler", cfg.get("scheduler")),
            ("steps", run.get("total_steps")), ("pairs per step", run.get("pairs_per_step")),
            ("train / eval pairs", f"{run.get('train_pairs')} / {run.get('eval_pairs')}"
             if run.get("train_pairs") is not None else None),
            ("reference cache", f"{cfg.get('cache')} ({cache.get('quantization')})" if cfg.get("cache") else None)]
    return [(k, str(v)) for k, v in rows if v is not None]


def _summary(run_dir: Path, db) -> str:
    items: list[tuple[str, str]] = []
    run_json = run_dir / "run.json"
    if run_json.exists():
        try:
            config = json.loads(run_json.read_text())
        except ValueError:
            config = {}
        if isinstance(config, dict):
            items += _settings(config)
        for key, value in (config.items() if isinstance(config, dict) else []):
            if isinstance(value, (str, int, float, bool)) and len(items) < 16:
                items.append((key, str(value)))
    if db.views.get("steps"):
        last = db.sql("SELECT split, step, loss, rewards_accuracies AS accuracy, rewards_margins AS margin "
                      "FROM steps QUALIFY row_number() OVER (PARTITION BY split ORDER BY step DESC) = 1 ORDER BY split")
        for split, step, loss, acc, margin in last.iter_rows():
            items.append((f"last {split} step {step}", f"loss {_fmt(loss)}, accuracy {_fmt(acc)}, margin {_fmt(margin)}"))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in items)
    return f'<table class="summary">{rows}</table>'


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d232b;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde3ea;padding-bottom:4px}
.meta{color:#5b6673;margin:0 0 12px}.grid2{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:14px}
.grid2>svg,.grid2>div{width:100%;height:auto;background:#fff;border:1px solid #e3e8ee;border-radius:6px}
svg .title{font-size:14px;font-weight:600;fill:#1d232b}svg .tick{font-size:11px;fill:#4b5563}svg .note{font-size:9.5px;fill:#8a94a3}
svg .label{font-size:12px;fill:#374151}svg .grid{stroke:#eef1f4}svg .axis{stroke:#9aa5b1}
svg .zero{stroke:#6b7280;stroke-dasharray:4 3}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0}th,td{border:1px solid #e3e8ee;padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#f3f5f8}table.summary th{background:#f8f9fb;font-weight:600}.empty{color:#8a94a3;font-style:italic}
"""


def build_report(run_dir: str | os.PathLike) -> str:
    """The report of one run directory as an HTML string."""
    run_dir = Path(run_dir)
    with connect(runs=[run_dir]) as db:
        sections = [f"<h1>prefcache report: {html.escape(run_dir.resolve().name)}</h1>",
                    f'<p class="meta">{html.escape(str(run_dir.resolve()))} · generated '
                    f'{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>', _summary(run_dir, db),
                    "<h2>Training curves</h2>", '<div class="grid2">', *_curves(db), "</div>"]
        split = _split_with_examples(db)
        sections.append("<h2>Margins and length bias</h2>")
        if split:
            sections += ['<div class="grid2">', *_histograms(db, split), *_length_bias(db, split), "</div>"]
            hardest = db.query("hardest_pairs", split=split, limit=5)
            if len(hardest):
                sections += [f"<h2>Hardest pairs ({split}, last logged step)</h2>",
                             _table(hardest, ["id", "margin", "reward_chosen", "reward_rejected", "prompt", "chosen", "rejected"],
                                    tail=("prompt",))]
        else:
            sections.append('<p class="empty">No per-example logs (logs/examples-*.parquet).</p>')
        if db.views.get("evals"):
            evals = db.query("checkpoint_compare")
            sections += ["<h2>Evaluations</h2>",
                         _table(evals, ["source", "task", "metric", "checkpoint", "step", "value", "stderr", "n", "delta", "z"])]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width, initial-scale=1"><title>prefcache report: {html.escape(run_dir.resolve().name)}'
            f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write :func:`build_report` to ``out`` (default ``RUN_DIR/report.html``) and return its path."""
    path = Path(out) if out else Path(run_dir) / "report.html"
    write_text_atomic(path, build_report(run_dir))
    return path
