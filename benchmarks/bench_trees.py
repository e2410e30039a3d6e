"""Two checkouts of prefcache side by side: the reference pass and training at their defaults, through the
public API only (``prefcache.precompute``, ``prefcache.train``), so any two versions can be compared.

    python benchmarks/bench_trees.py --old /tmp/prefcache-main --new .          # both shapes, 2 rounds
    python benchmarks/bench_trees.py --old /tmp/prefcache-main --new . --shape prompt --rounds 3

Each run is its own subprocess with ``PYTHONPATH`` set to its tree, the same data (benchmarks/data.py,
seeded), model (the embedded SmolLM2-135M-Instruct), threads and allocator (jemalloc when installed).
Rounds alternate old/new, so a busy spell on a shared machine hits both alike; the fastest round counts.
Printed: precompute pairs/s and peak RSS; train seconds per step (mean after the first step, from the
run's own step log) and peak RSS; and new/old ratios. A benchmark, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MARK = "TREE_RESULT "
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def child(kind: str, spec: dict) -> dict:
    import polars as pl
    import torch

    import prefcache

    torch.set_num_threads(spec["threads"])
    if kind == "precompute":
        r = prefcache.precompute(data=spec["data"], out=spec["cache"], max_length=spec["max_length"],
                                 batch_size=spec["batch_size"], progress=False)
        out = {"pairs_per_s": r["pairs_per_s"], "seconds": r["seconds"]}
    else:
        prefcache.train(data=spec["data"], cache=spec["cache"], out=spec["run"], max_steps=spec["steps"],
                        batch_size=spec["batch_size"], progress=False, seed=0)
        steps = pl.read_parquet(f"{spec['run']}/logs/steps-*.parquet").filter(pl.col("split") == "train").sort("step")
        ends = steps["time_s"].to_list()
        out = {"s_per_step": (ends[-1] - ends[0]) / (len(ends) - 1)}
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def launch(tree: Path, kind: str, spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(spec["threads"]), TQDM_DISABLE="1",
               HF_HUB_OFFLINE="1")
    env.pop("LD_PRELOAD", None)
    if Path(JEMALLOC).exists():
        env["LD_PRELOAD"] = JEMALLOC
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tree)
    lines = [line for line in res.stdout.splitlines() if line.startswith(MARK)]
    if res.returncode or not lines:
        raise RuntimeError(f"{tree} {kind} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-3000:]}")
    return json.loads(lines[-1][len(MARK):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", help="a checkout of prefcache (the baseline)")
    ap.add_argument("--new", default=str(HERE.parent), help="another checkout [default: this one]")
    ap.add_argument("--shape", default="both", choices=("answer", "prompt", "both"))
    ap.add_argument("--pairs", type=int, default=32, help="pairs precomputed and trained on")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(MARK + json.dumps(child(a.child, json.loads(a.spec))), flush=True)
        return
    if not a.old:
        ap.error("--old is required: a checkout of prefcache to compare with")

    sys.path.insert(0, str(HERE))
    from data import SHAPES, write_jsonl

    trees = {"old": Path(a.old).resolve(), "new": Path(a.new).resolve()}
    work = Path(tempfile.mkdtemp(prefix="bench-trees-"))
    for shape in ("answer", "prompt") if a.shape == "both" else (a.shape,):
        data = write_jsonl(work / f"{shape}.jsonl", SHAPES[shape](a.pairs, seed=0, conversational=True))
        best: dict = {}
        for rnd in range(a.rounds):
            for name, tree in trees.items():
                spec = {"data": str(data), "cache": str(work / f"{shape}-{name}-{rnd}-cache"),
                        "run": str(work / f"{shape}-{name}-{rnd}-run"), "max_length": a.max_length,
                        "batch_size": a.batch_size, "steps": a.steps, "threads": a.threads}
                for kind in ("precompute", "train"):
                    r = launch(tree, kind, spec)
                    key, faster = (name, kind), ("pairs_per_s" in r and r["pairs_per_s"]) or -r["s_per_step"]
                    if key not in best or faster > best[key]["_rank"]:
                        best[key] = r | {"_rank": faster}
                    print(f"  round {rnd + 1} {shape:<6} {name:<3} {kind:<10} "
                          + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
        p_old, p_new = best["old", "precompute"], best["new", "precompute"]
        t_old, t_new = best["old", "train"], best["new", "train"]
        print(f"[{shape}-heavy, {a.pairs} pairs, batch {a.batch_size}, max_length {a.max_length}, "
              f"{a.threads} threads, load {os.getloadavg()[0]:.1f}]")
        print(f"  precompute pairs/s   old {p_old['pairs_per_s']:8.2f}  new {p_new['pairs_per_s']:8.2f}  "
              f"new/old {p_new['pairs_per_s'] / p_old['pairs_per_s']:.2f}")
        print(f"  precompute peak MB   old {p_old['peak_mb']:8.0f}  new {p_new['peak_mb']:8.0f}  "
              f"new/old {p_new['peak_mb'] / p_old['peak_mb']:.2f}")
        print(f"  train s/step         old {t_old['s_per_step']:8.3f}  new {t_new['s_per_step']:8.3f}  "
              f"new/old {t_new['s_per_step'] / t_old['s_per_step']:.2f}")
        print(f"  train peak MB        old {t_old['peak_mb']:8.0f}  new {t_new['peak_mb']:8.0f}  "
              f"new/old {t_new['peak_mb'] / t_old['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
