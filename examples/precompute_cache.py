"""Precompute a reference log-prob cache with the Python API: the frozen model runs once, here and only here.

    python examples/precompute_cache.py                          # 16 pairs, 4-bit NF4, max length 128
    python examples/precompute_cache.py --pairs 256 --quantize fp32

Builds the controlled-sentiment dataset (examples/make_dataset.py), scores every pair once with the embedded
SmolLM2-135M-Instruct, and writes OUT/cache/part-r000-*.parquet. Then prints what `prefcache inspect` shows
and checks the cache against the data as `prefcache verify --data` does. Running it again scores nothing:
the ids already cached are skipped. The same as the CLI:

    prefcache precompute --data OUT/data/train.jsonl --out OUT/cache --quantize 4bit --max-length 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polars as pl

import prefcache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_dataset import build  # noqa: E402  (examples/make_dataset.py, next to this file)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/example"), help="writes OUT/data/ and OUT/cache/")
    ap.add_argument("--pairs", type=int, default=16, help="training pairs to build and score")
    ap.add_argument("--quantize", default="4bit", help="4bit (NF4), 8bit, bf16, fp16, fp32 or auto")
    ap.add_argument("--max-length", type=int, default=128, help="tokens of prompt + completion kept")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    ap.add_argument("--model", default=None, help="HF folder or .gguf [default: embedded SmolLM2-135M-Instruct]")
    args = ap.parse_args()

    paths = build(args.out / "data", train=args.pairs, heldout=max(args.pairs // 4, 1))
    data, cache = str(paths["train"]), str(args.out / "cache")

    result = prefcache.precompute(data=data, out=cache, model=args.model, quantize=args.quantize,
                                  max_length=args.max_length, batch_size=args.batch_size)
    print(f"\n{cache}: {result['scored']} pairs scored, {result['cached_before']} already cached, "
          f"{result['bad_rows']} bad rows; {result['seconds']:.1f}s ({result['tokens_per_s']:,.0f} tokens/s)")

    info = prefcache.inspect_cache(cache)  # a dict: metadata, row counts, per-column statistics
    meta = info["metadata"]
    print(f"\n{info['rows']} rows in {info['shards']} shard(s); made by {meta['model_name']} "
          f"({meta['quantization']}, {meta['dtype']}), max_length {meta['max_length']}, {meta['truncation']}")
    for column, stats in info["columns"].items():
        print(f"  {column:<16} mean {stats['mean']:>9.3f}   min {stats['min']:>9.3f}   max {stats['max']:>9.3f}")
    print(f"  the reference already prefers the chosen answer on {info['ref_prefers_chosen_frac']:.0%} of pairs")

    report = prefcache.verify_cache(cache, data)  # {"summary": str, "problems": [str, ...]}
    print("\n" + report["summary"])
    if report["problems"]:
        sys.exit("\n".join(report["problems"]))

    # The cache is plain Parquet: any reader works. Columns: prefcache/cache/store.py's schema().
    table = prefcache.read_cache(cache, columns=["id", "chosen_logps", "rejected_logps", "chosen_tokens"])
    print(pl.from_arrow(table).head(3))
    print(f"\nnext: python examples/train_from_cache.py --data {data} --cache {cache}")


if __name__ == "__main__":
    main()
