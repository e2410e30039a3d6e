"""prefcache end to end on the embedded SmolLM2-135M-Instruct, on CPU, in about six minutes on 2 cores.

    python examples/demo.py                # the default run (make demo)
    python examples/demo.py --scale 4      # 4x the data and steps

1. builds a controlled-sentiment preference dataset with a held-out split (examples/make_dataset.py)
2. precomputes 4-bit NF4 reference caches of both splits with the frozen reference
3. trains a QLoRA policy (same 4-bit base + LoRA) with the DPO loss from the cache: no reference model
4. evaluates base and trained checkpoints with lm-eval on a local task built from the held-out split,
   and with cached preference accuracy (`prefcache score`, no reference model either)
5. queries rewards with SQL and writes the HTML report
and ends with a summary: memory and time of each stage, rewards before and after, lm-eval before and after.
Every stage is the real CLI in its own process, so each peak memory figure is that stage's alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_dataset import build  # noqa: E402  (pure Python: this process stays small, see stage())

STAGES: list[dict] = []


def stage(name: str, *args: str, script: str | None = None) -> None:
    """Run ``prefcache ARGS`` (or ``python SCRIPT ARGS``) in a child process; record its wall time and peak
    RSS (from wait4). Linux starts a child's peak RSS at its parent's, so this process imports nothing big."""
    cmd = [sys.executable, *([str(HERE / script)] if script else ["-m", "prefcache"]), *args]
    print(f"\n=== {name}\n$ {'python examples/' + script if script else 'prefcache'} {shlex.join(args)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"stage {name!r} failed with exit code {code}")
    STAGES.append({"stage": name, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024})


def query(args: list[str]) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "prefcache", *args, "--format", "json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"), help="working folder (recreated)")
    ap.add_argument("--scale", type=int, default=1, help="multiply data and steps")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps [default: 32 x scale]")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    out = args.out.resolve()
    if out.exists():
        import shutil

        shutil.rmtree(out)
    train_n, heldout_n, steps = 128 * args.scale, 96 * args.scale, args.steps or 32 * args.scale
    t_start = time.perf_counter()

    print(f"=== data: {train_n} training pairs, {heldout_n} held-out pairs (unseen products and phrasings)")
    paths = build(out / "data", train=train_n, heldout=heldout_n, seed=args.seed)
    stage("lm-eval task from held-out", "--data", str(paths["heldout"]), "--out", str(out / "task"),
          script="make_lm_eval_task.py")
    train, heldout = str(paths["train"]), str(paths["heldout"])
    common = ["--max-length", "128", "--quantize", "4bit"]

    stage("precompute train (4-bit ref)", "precompute", "--data", train, "--out", str(out / "cache-train"),
          "--batch-size", "8", *common)
    stage("precompute held-out", "precompute", "--data", heldout, "--out", str(out / "cache-heldout"),
          "--batch-size", "8", *common)
    stage("train (QLoRA, DPO, no ref)", "train", "--data", train, "--cache", str(out / "cache-train"),
          "--out", str(out / "run"), "--finetune", "qlora", "--loss", "sigmoid", "--beta", str(args.beta),
          "--lr", str(args.lr), "--max-steps", str(steps), "--batch-size", "4", "--warmup-steps", "2",
          "--eval-data", heldout, "--eval-cache", str(out / "cache-heldout"), "--eval-every", str(max(steps // 3, 1)),
          "--save-every", str(steps), "--seed", str(args.seed))
    final = sorted((out / "run" / "checkpoints").glob("step-*"))[-1]
    stage("score base + trained (cached)", "score", str(final), "--base", "--cache", str(out / "cache-heldout"),
          "--data", heldout)
    stage("lm-eval base + trained", "eval", str(final), "--tasks", "prefcache_heldout",
          "--include-path", str(out / "task"))
    stage("SQL report", "report", str(out / "run"))

    print("\n=== SQL: reward summary on the held-out split (prefcache query reward_summary --run RUN -p split=eval)")
    subprocess.run([sys.executable, "-m", "prefcache", "query", "reward_summary", "--run", str(out / "run"),
                    "-p", "split=eval"], check=True)
    evals = query(["sql", "SELECT checkpoint, task, metric, value FROM evals ORDER BY task, metric, step NULLS FIRST",
                   "--run", str(out / "run")])
    summary(evals, out, time.perf_counter() - t_start)


def summary(evals: list[dict], out: Path, total: float) -> None:
    print("\n=== summary")
    print(f"{'stage':<32} {'time (s)':>9} {'peak RSS (MB)':>14}")
    for s in STAGES:
        print(f"{s['stage']:<32} {s['seconds']:>9.1f} {s['peak_rss_mb']:>14.0f}")
    print(f"{'total':<32} {total:>9.1f}")
    by = {}
    for row in evals:
        by.setdefault((row["task"], row["metric"]), {})["base" if row["checkpoint"] == "base" else "trained"] = row["value"]
    print(f"\n{'held-out metric':<44} {'base':>9} {'trained':>9}")
    wanted = [("preference", "rewards_accuracies"), ("preference", "rewards_margins"),
              ("preference", "rewards_chosen"), ("preference", "rewards_rejected"),
              ("prefcache_heldout", "acc"), ("prefcache_heldout", "acc_norm")]
    for key in wanted:
        if key in by:
            v = by[key]
            print(f"{key[0] + ' ' + key[1]:<44} {v.get('base', float('nan')):>9.3f} {v.get('trained', float('nan')):>9.3f}")
    acc = by.get(("prefcache_heldout", "acc"), {})
    if "base" in acc and "trained" in acc:
        verdict = "beats" if acc["trained"] > acc["base"] else "does NOT beat"
        print(f"\nThe trained checkpoint {verdict} the base on the held-out lm-eval task "
              f"({acc['trained']:.3f} vs {acc['base']:.3f}).")
    print(f"Everything is in {out}: caches, run logs, checkpoints, run/report.html")


if __name__ == "__main__":
    main()
