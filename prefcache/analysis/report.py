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

from prefcache.analysis.charts import (
    CHANCE,
    CHOSEN,
    EVAL,
    FIRST,
    LAST,
    REJECTED,
    TRAIN,
    _nice_ticks,
    bar_chart,
    fmt,
    histogram_chart,
    line_chart,
)
from prefcache.analysis.views import AnalysisError, connect
from prefcache.core.atomic import write_text_atomic

# ---------------------------------------------------------------------------------------------------------
# The report.

def _table(df, columns: list[str] | None = None, max_chars: int = 160, tail: tuple[str, ...] = (),
           first: list[str] | None = None) -> str:
    """An HTML table; long texts are cut to ``max_chars``, keeping their end in the ``tail`` columns (a
    prompt's question comes last, after the template's system prompt). ``first``: ready HTML for a first
    column (``images``), one cell a row."""
    columns = columns or df.columns
    head = "".join(f"<th>{html.escape(c)}</th>" for c in (["images"] if first else []) + columns)
    body = []
    for k, row in enumerate(df.select(columns).iter_rows()):
        cells = [f"<td>{first[k]}</td>"] if first else []
        for name, v in zip(columns, row, strict=True):
            text = fmt(v) if isinstance(v, float) and math.isfinite(v) else ("" if v is None else str(v))
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


def _extreme_pairs(db, split: str) -> list[str]:
    """The hardest pairs (most negative margins) and the widest margins at the last logged step; a vision run's
    pairs with their images as inline thumbnails (:mod:`prefcache.analysis.thumbnails`)."""
    out = []
    for order, title in (("hardest", "Hardest pairs"), ("widest", "Widest margins")):
        pairs = db.query("hardest_pairs", split=split, limit=5, order=order)
        if len(pairs):
            out += [f"<h2>{title} ({split}, last logged step)</h2>",
                    _table(pairs, ["id", "margin", "reward_chosen", "reward_rejected", "prompt", "chosen", "rejected"],
                           tail=("prompt",), first=_thumbnails(db, pairs["id"].to_list()))]
    return out


def _thumbnails(db, ids: list[str]) -> list[str] | None:
    """Per id, its images' thumbnails as HTML; None when the run has no images (a text run)."""
    images = db.sql("SELECT id, sha256, path FROM example_images WHERE list_contains($ids, id) ORDER BY id, position",
                    ids=ids)
    if not len(images):
        return None
    from prefcache.analysis.thumbnails import thumbnail

    cells: dict[str, list[str]] = {}
    for ident, sha256, path in images.iter_rows():
        cells.setdefault(ident, []).append(thumbnail(path, sha256))
    return [" ".join(cells.get(i, [])) for i in ids]


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
            items.append((f"last {split} step {step}", f"loss {fmt(loss)}, accuracy {fmt(acc)}, margin {fmt(margin)}"))
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
            sections += _extreme_pairs(db, split)
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
