"""Time the named queries on a synthetic cache and run log of 1,000,000 pairs.

    python benchmarks/bench_sql.py                  # 1M pairs in a temp dir, best of 3 after a warm-up
    python benchmarks/bench_sql.py --pairs 20000 --keep /tmp/synth   # keep the data (e.g. for `prefcache report`)

The data follows the contract's schemas and types: a cache of 8 shards (int32 token counts,
float64 log-prob sums, bools), and a run whose training logs every pair once (one logged step per
batch of --batch pairs, written in 10 files) plus an eval split of --eval-size pairs every
--eval-every steps. Margins grow over training, with a small built-in preference for longer answers
so that the length-bias query has something to find.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BETA = 0.1


def _ids(n: int) -> pa.Array:
    # 32-hex ids like the content-hash ids of prefcache.data.pairs (hashing 1M strings takes ~1 s)
    return pa.array([hashlib.md5(str(i).encode()).hexdigest() for i in range(n)], type=pa.string())


def synthesize(root: Path, n: int, *, batch: int = 1000, eval_every: int = 100, eval_size: int = 2000,
               pairs: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """Write ROOT/cache and ROOT/run; returns their paths."""
    rng = np.random.default_rng(seed)
    ids = _ids(n)
    prompt = np.clip(rng.lognormal(4.2, 0.6, n), 4, 900).astype(np.int32)
    chosen = np.clip(rng.lognormal(5.2, 0.6, n), 1, 1024).astype(np.int32)
    rejected = np.clip(rng.lognormal(5.1, 0.6, n), 1, 1024).astype(np.int32)
    room = 1024 - prompt  # max_length 1024, keep_start truncation
    chosen_trunc, rejected_trunc = chosen > room, rejected > room
    chosen, rejected = np.minimum(chosen, room), np.minimum(rejected, room)
    per_tok_c, per_tok_r = rng.normal(1.1, 0.25, n).clip(0.05), rng.normal(1.2, 0.25, n).clip(0.05)
    ref_c, ref_r = -chosen * per_tok_c, -rejected * per_tok_r
    short = np.minimum(chosen, rejected)
    cache = pa.table({
        "id": ids, "chosen_logps": ref_c, "rejected_logps": ref_r,
        "chosen_logps_prefix": -short * per_tok_c, "rejected_logps_prefix": -short * per_tok_r,
        "prompt_tokens": prompt, "chosen_tokens": chosen, "rejected_tokens": rejected,
        "chosen_truncated": chosen_trunc, "rejected_truncated": rejected_trunc,
    })
    cache_dir, run_dir = root / "cache", root / "run"
    cache_dir.mkdir(parents=True)
    meta = {b"prefcache": json.dumps({"schema_version": 1, "model_name": "synthetic", "quantization": "none"}).encode()}
    shards = 8
    for s in range(shards):
        part = cache.slice(s * n // shards, (s + 1) * n // shards - s * n // shards)
        pq.write_table(part.replace_schema_metadata(meta), cache_dir / f"part-r000-{s:06d}.parquet")

    def examples(rows: np.ndarray, step: np.ndarray, split: str) -> pa.Table:
        progress = step / max(n // batch, 1)
        delta = chosen[rows].astype(np.float64) - rejected[rows]
        margin = rng.normal(2.0 * progress, 0.5 + 1.5 * progress) + 0.004 * delta * progress
        reward_c = margin / 2 + rng.normal(0, 0.3, len(rows))
        reward_r = reward_c - margin
        return pa.table({
            "id": ids.take(pa.array(rows)), "step": step.astype(np.int64), "split": pa.array([split] * len(rows)),
            "checkpoint": pa.nulls(len(rows), pa.string()),
            "policy_chosen_logps": ref_c[rows] + reward_c / BETA, "policy_rejected_logps": ref_r[rows] + reward_r / BETA,
            "ref_chosen_logps": ref_c[rows], "ref_rejected_logps": ref_r[rows],
            "reward_chosen": reward_c, "reward_rejected": reward_r, "margin": margin,
            "prompt_tokens": prompt[rows], "chosen_tokens": chosen[rows], "rejected_tokens": rejected[rows],
        })

    (run_dir / "logs").mkdir(parents=True)
    order = rng.permutation(n)
    steps_total = -(-n // batch)
    step_of = np.arange(n) // batch + 1
    files = 10
    for f in range(files):
        lo, hi = f * n // files, (f + 1) * n // files
        pq.write_table(examples(order[lo:hi], step_of[lo:hi], "train"), run_dir / "logs" / f"examples-{f:06d}.parquet")
    eval_rows = order[:eval_size]
    eval_steps = list(range(eval_every, steps_total + 1, eval_every)) or [steps_total]
    pq.write_table(pa.concat_tables([examples(eval_rows, np.full(eval_size, s), "eval") for s in eval_steps]),
                   run_dir / "logs" / "examples-eval.parquet")
    steps = np.arange(1, steps_total + 1)
    p = steps / steps_total
    acc = 0.5 + 0.4 * (1 - np.exp(-4 * p))
    rows = {"step": np.concatenate([steps, eval_steps]).astype(np.int64),
            "epoch": np.concatenate([p, np.array(eval_steps) / steps_total]),
            "split": ["train"] * steps_total + ["eval"] * len(eval_steps)}
    loss_train = 0.6931 * np.exp(-1.2 * p) + rng.normal(0, 0.02, steps_total)
    loss_eval = 0.6931 * np.exp(-1.0 * np.array(eval_steps) / steps_total) + 0.02
    metrics = {
        "loss": np.concatenate([loss_train, loss_eval]),
        "rewards_accuracies": np.concatenate([acc + rng.normal(0, 0.02, steps_total), acc[np.array(eval_steps) - 1] - 0.03]),
        "rewards_margins": np.concatenate([2.0 * p, 1.8 * np.array(eval_steps) / steps_total]),
    }
    m = len(rows["step"])
    table = pa.table({**rows, "loss": metrics["loss"],
                      "rewards_chosen": metrics["rewards_margins"] / 2, "rewards_rejected": -metrics["rewards_margins"] / 2,
                      "rewards_margins": metrics["rewards_margins"], "rewards_accuracies": metrics["rewards_accuracies"],
                      "logps_chosen": np.full(m, -220.0), "logps_rejected": np.full(m, -230.0),
                      "lr": np.full(m, 5e-6), "grad_norm": rng.gamma(2.0, 1.0, m), "tokens_per_s": np.full(m, 900.0),
                      "peak_mem_mb": np.full(m, 1400.0), "time_s": rows["step"] * 1.5})
    pq.write_table(table, run_dir / "logs" / "steps-000000.parquet")
    if pairs:
        text = pa.array([f"synthetic prompt {i}" for i in range(n)])
        pq.write_table(pa.table({"id": ids, "prompt": text, "chosen": pa.array([f"a helpful answer {i}" for i in range(n)]),
                                 "rejected": pa.array([f"an unhelpful answer {i}" for i in range(n)])}), run_dir / "pairs.parquet")
    (run_dir / "run.json").write_text(json.dumps({"model": "synthetic", "loss": "sigmoid", "beta": BETA, "pairs": n}))
    return cache_dir, run_dir


QUERIES = [
    ("reward_summary", {"split": "train"}),
    ("margin_histogram", {"step": "all", "bins": 50}),
    ("margin_histogram", {"step": "last", "bins": 50}),
    ("length_bias", {"step": "all", "width": 32}),
    ("length_stats", {}),
    ("cache_coverage", {}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    ap.add_argument("--keep", type=Path, help="write the data here and keep it")
    args = ap.parse_args()
    from prefcache.analysis.views import connect

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_sql-"))
    t0 = time.perf_counter()
    cache_dir, run_dir = synthesize(root, args.pairs, pairs=args.keep is not None)
    print(f"synthesized {args.pairs:,} pairs in {time.perf_counter() - t0:.1f} s under {root} "
          f"(cores: {os.cpu_count()}, DuckDB threads: {args.threads or 'default'})")
    with connect(caches=[cache_dir], runs=[run_dir], threads=args.threads) as db:
        n_examples = db.sql("SELECT count(*) AS n FROM examples")["n"][0]
        print(f"examples view: {n_examples:,} rows; cache view: {db.sql('SELECT count(*) AS n FROM cache')['n'][0]:,} rows\n")
        print(f"{'query':<18} {'params':<28} {'rows':>6} {'best s':>8} {'all runs (s)':>24}")
        for name, params in QUERIES:
            db.query(name, **params)  # warm-up: file metadata and OS page cache
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                out = db.query(name, **params)
                times.append(time.perf_counter() - t)
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            print(f"{name:<18} {shown:<28} {len(out):>6} {min(times):>8.3f} {' '.join(f'{t:.3f}' for t in times):>24}")
    if args.keep is None:
        import shutil

        shutil.rmtree(root)


if __name__ == "__main__":
    main()
