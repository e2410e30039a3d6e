"""Fault injection on the reference cache: kills at random points, concurrent writers, a full disk.

Each trial ends with a check against one uninterrupted cache of the same data: the same ids, no
duplicates, reference values bit-equal, `verify` clean, no temporary or lock files left. Prints one
"N of N survived" line per kind of fault.

    python benchmarks/fault_injection.py [--kills 10] [--concurrent 5] [--disk-full 5] [--seed 0]

Uses a tiny random Llama with the embedded SmolLM2 tokenizer (CPU, a few seconds a pass).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PREFCACHE_ALLOCATOR": "system",
       "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WORDS = "the a cat dog sat ran on under blue red quick slow house tree river sky".split()


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        out.append({"prompt": f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))),
                    "chosen": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))),
                    "rejected": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))})
    return out


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def tiny_model(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefcache.model.load import default_model, hf_folder, load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(hf_folder(default_model()))))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def precompute_cmd(data: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-m", "prefcache", "precompute", "--data", str(data), "--out", str(out), "--model",
            str(model), "--max-length", "96", "--shard-size", "8", "--batch-size", "4", "--no-progress"]


def snapshot(cache: Path) -> dict:
    """id -> (chosen, rejected) reference values, and the duplicate count."""
    from prefcache.cache.store import read_cache

    t = read_cache(cache, columns=["id", "chosen_logps", "rejected_logps"]).to_pydict()
    values = dict(zip(t["id"], zip(t["chosen_logps"], t["rejected_logps"], strict=True), strict=True))
    return {"values": values, "duplicates": len(t["id"]) - len(values)}


def check(cache: Path, reference: dict, want_ids: set[str] | None = None, tolerance: float = 0.0) -> str | None:
    """None when the cache is whole and equals the reference on ``want_ids`` (bit-equal, or within
    ``tolerance`` nats when the pairs were batched differently); else what is wrong."""
    from prefcache.cache.store import verify

    if problems := verify(cache):
        return "verify: " + problems[0]
    snap = snapshot(cache)
    want = want_ids if want_ids is not None else set(reference)
    if snap["duplicates"]:
        return f"{snap['duplicates']} duplicate ids"
    if set(snap["values"]) != want:
        return f"ids differ: {len(set(snap['values']) ^ want)} missing or extra"
    if diff := [i for i in want if max(abs(a - b) for a, b in zip(snap["values"][i], reference[i], strict=True))
                > tolerance]:
        return f"{len(diff)} ids with values off by more than {tolerance}"
    if left := [p.name for p in cache.iterdir() if p.name.startswith(".")]:
        return f"leftovers: {left}"
    return None


def kills(work: Path, data: Path, model: Path, reference: dict, n: int, rng: random.Random, shards: int) -> list[str]:
    failures = []
    for trial in range(n):
        out = work / f"kill-{trial}"
        p = subprocess.Popen(precompute_cmd(data, out, model), env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        # A random point of the pass: after k shards (k = 0: once it holds the lock), plus up to 0.3 s.
        k = rng.randrange(shards)
        while p.poll() is None and (not (out / ".prefcache-lock").exists() or len(list(out.glob("part-r*"))) < k):
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        p.send_signal(signal.SIGKILL)
        p.wait()
        state = "finished" if p.returncode == 0 else (f"{len(list(out.glob('part-r*')))} shards, "
                                                     f"{len(list(out.glob('.tmp-*')))} temp files")
        r = subprocess.run(precompute_cmd(data, out, model), env=ENV, capture_output=True, text=True)
        problem = f"rerun failed: {r.stderr.strip()[-200:]}" if r.returncode else check(out, reference)
        print(f"  kill {trial + 1}: killed with {state}; {'OK' if problem is None else problem}", flush=True)
        if problem:
            failures.append(problem)
    return failures


def concurrent(work: Path, all_rows: list[dict], model: Path, reference: dict, n: int, rng: random.Random) -> list[str]:
    """Two writers on one cache, with overlapping data (3/4 of each shared), started together."""
    from prefcache.data.pairs import example_id

    failures = []
    for trial in range(n):
        out = work / f"concurrent-{trial}"
        k = len(all_rows)
        a = write_jsonl(work / f"a-{trial}.jsonl", all_rows[: k * 2 // 3])
        b = write_jsonl(work / f"b-{trial}.jsonl", all_rows[k // 3 :])
        procs = [subprocess.Popen(precompute_cmd(d, out, model), env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for d in (a, b)]
        time.sleep(rng.uniform(0, 0.5))
        errors = [p.communicate()[1] for p in procs]  # both finished before any rerun
        refused = 0
        for d, p, err in zip((a, b), procs, errors, strict=True):
            if p.returncode:
                if "being written by" not in err:
                    failures.append(f"unexpected failure: {err.strip()[-200:]}")
                refused += 1
                subprocess.run(precompute_cmd(d, out, model), env=ENV, capture_output=True, check=False)
        ids = {example_id(r["prompt"], r["chosen"], r["rejected"]) for r in all_rows}
        # The two data files put pairs into other batches than the reference pass did: fp32 sums differ
        # in the last bits, so values are compared to 1e-4 nats here (kills and disk-full reruns: bit-equal).
        problem = check(out, reference, ids, tolerance=1e-4)
        print(f"  concurrent {trial + 1}: {refused} writer(s) refused and rerun; {'OK' if problem is None else problem}",
              flush=True)
        if problem:
            failures.append(problem)
    return failures


def disk_full(work: Path, data: Path, model: Path, reference: dict, reference_dir: Path, n: int,
              rng: random.Random) -> list[str]:
    """A file-size limit (``ulimit -f``) between the manifest's size and the largest shard's."""
    sizes = sorted(p.stat().st_size for p in reference_dir.glob("part-r*"))
    manifest = (reference_dir / "manifest.json").stat().st_size
    failures = []
    for trial in range(n):
        out = work / f"full-{trial}"
        limit = rng.randint(max(manifest + 1, sizes[0] - 200), sizes[-1] - 1)

        def apply(limit=limit):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        r = subprocess.run(precompute_cmd(data, out, model), env=ENV, capture_output=True, text=True, preexec_fn=apply)
        lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]  # not the loaders' bars
        one_line = r.returncode == 1 and len(lines) == 1 and "cannot write" in lines[0] and "Traceback" not in r.stderr
        partial = [p for p in out.glob("part-r*")] if out.exists() else []
        whole = all(p.stat().st_size <= limit for p in partial) and not list(out.glob(".tmp-*"))
        r2 = subprocess.run(precompute_cmd(data, out, model), env=ENV, capture_output=True, text=True)
        problem = None
        if not one_line:
            problem = f"not one clear line (rc {r.returncode}): {r.stderr.strip()[-300:]}"
        elif not whole:
            problem = "a partial shard was left"
        elif r2.returncode:
            problem = f"rerun failed: {r2.stderr.strip()[-200:]}"
        else:
            problem = check(out, reference)
        print(f"  file-size limit {trial + 1}: limit {limit:,} B, {len(partial)} whole shards kept; "
              f"{'OK' if problem is None else problem}" + (f"\n    {lines[0][:160]}" if lines else ""), flush=True)
        if problem:
            failures.append(problem)
    return failures


def full_tmpfs(work: Path, data: Path, model: Path, reference: dict, reference_dir: Path, n: int,
               rng: random.Random) -> list[str] | None:
    """A real ENOSPC mid-pass: the cache on a tmpfs too small for it (root only), then grown and rerun."""
    total = sum(p.stat().st_size for p in reference_dir.iterdir())
    failures = []
    for trial in range(n):
        mnt = work / f"tmpfs-{trial}"
        mnt.mkdir()
        size = rng.randint(total // 5, total * 4 // 5) // 4096 * 4096 + 8192
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True).returncode:
            return None  # not permitted here
        try:
            out = mnt / "cache"
            r = subprocess.run(precompute_cmd(data, out, model), env=ENV, capture_output=True, text=True)
            lines = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
            kept = list(out.glob("part-r*"))
            readable = all(_readable(p) for p in kept) and not list(out.glob(".tmp-*"))
            subprocess.run(["mount", "-o", f"remount,size={total * 3}", str(mnt)], check=True)  # space freed
            r2 = subprocess.run(precompute_cmd(data, out, model), env=ENV, capture_output=True, text=True)
            if not (r.returncode == 1 and len(lines) == 1 and "no space left" in lines[0]):
                problem = f"not one clear line (rc {r.returncode}): {r.stderr.strip()[-300:]}"
            elif not readable:
                problem = "a partial shard was left"
            elif r2.returncode:
                problem = f"rerun failed: {r2.stderr.strip()[-200:]}"
            else:
                problem = check(out, reference)
            print(f"  full disk {trial + 1}: tmpfs of {size:,} B, {len(kept)} whole shards kept; "
                  f"{'OK' if problem is None else problem}" + (f"\n    {lines[0][:200]}" if lines else ""), flush=True)
            if problem:
                failures.append(problem)
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    return failures


def _readable(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        pq.read_table(path)
        return True
    except Exception:  # noqa: BLE001 - any failure is a damaged shard
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--concurrent", type=int, default=5)
    parser.add_argument("--disk-full", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="prefcache-faults-") as tmp:
        work = Path(tmp)
        model = tiny_model(work / "model")
        all_rows = rows(args.pairs)
        data = write_jsonl(work / "d.jsonl", all_rows)
        subprocess.run(precompute_cmd(data, work / "reference", model), env=ENV, check=True, capture_output=True)
        shards = len(list((work / "reference").glob("part-r*")))
        reference = snapshot(work / "reference")["values"]
        results = {}
        if args.kills:
            print(f"SIGKILL at a random point of precompute, then a rerun ({args.kills} trials)", flush=True)
            results["kills"] = (args.kills, kills(work, data, model, reference, args.kills, rng, shards))
        if args.concurrent:
            print(f"two concurrent writers, overlapping data ({args.concurrent} trials)", flush=True)
            results["concurrent writers"] = (args.concurrent, concurrent(work, all_rows, model, reference,
                                                                         args.concurrent, rng))
        if args.disk_full:
            print(f"file-size limit hit mid-pass, then a rerun ({args.disk_full} trials)", flush=True)
            results["file-size limit"] = (args.disk_full, disk_full(work, data, model, reference,
                                                                    work / "reference", args.disk_full, rng))
            print(f"cache on a full tmpfs, then space freed and a rerun ({args.disk_full} trials)", flush=True)
            tmpfs = full_tmpfs(work, data, model, reference, work / "reference", args.disk_full, rng)
            if tmpfs is None:
                print("  (tmpfs not mountable here: skipped)")
            else:
                results["full disk (tmpfs)"] = (args.disk_full, tmpfs)
        print()
        for name, (n, failures) in results.items():
            print(f"{name}: {n - len(failures)} of {n} survived")


if __name__ == "__main__":
    main()
