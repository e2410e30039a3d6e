"""Peak memory of the data side of precompute and of train / score: reading, validating, id-ing and tokenising N pairs.

Each measurement runs in a fresh process (peak RSS = ``ru_maxrss``), on a Parquet file of N synthetic
standard-format pairs tokenised with SmolLM2's tokenizer, in six ways:
- ``blocks``: what precompute does, ``iter_pair_blocks`` (4,096 rows at a time), keeping only the ids;
- ``whole``: ``load_dataset_pairs``, every row, example and token list in memory at once (what precompute did
  before, and what train and score did before the data store);
- ``store1``: train's data side on a first start: the data store written (read and tokenised in blocks), mapped,
  its lengths column read, the epoch's length-grouped order made and one batch of 8 pairs built;
- ``store2``: the same on a second start (a resume, another rank, another run on the same data): the store
  exists, so it is only mapped;
- ``kto-whole``: ``load_unpaired`` of the pairs unpaired (2N examples), all in memory at once: what train's
  KTO path did on a first start before its store was written in blocks;
- ``kto-store1``: train's KTO data side on a first start (``--unpair``): the unpaired store written in blocks,
  mapped, the epoch's order made and one batch of 8 examples built.
No model is loaded: this is the cost of the data alone. The allocator is the one ``prefcache precompute``
runs with (jemalloc when installed, see prefcache/core/allocator.py; ``--allocator system`` for glibc malloc).
Usage:
  python benchmarks/bench_data_memory.py --pairs 10000 1000000 [--whole-up-to 100000] [--modes store1 store2]
      [--modes kto-whole kto-store1]
      [--allocator system]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_parquet(path: Path, n: int) -> None:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = "the a cat dog sat ran on under blue red quick slow house tree river sky".split()
    writer = None
    for start in range(0, n, 100_000):
        rows = []
        for i in range(start, min(n, start + 100_000)):
            rows.append({"prompt": f"Question {i}: " + " ".join(rng.choices(words, k=rng.randint(8, 40))),
                         "chosen": " " + " ".join(rng.choices(words, k=rng.randint(10, 60))),
                         "rejected": " " + " ".join(rng.choices(words, k=rng.randint(10, 60)))})
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def measure(path: str, mode: str) -> dict:
    from prefcache.data.pairs import iter_pair_blocks, load_dataset_pairs
    from prefcache.model.load import default_model, load_tokenizer

    tokenizer = load_tokenizer(default_model())
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if mode == "blocks":
        import pyarrow as pa

        ids = []  # as precompute keeps them: Arrow arrays, for the coverage check at the end
        for pairs, _ in iter_pair_blocks(path, tokenizer, 1024, on_bad_row="skip"):
            ids.append(pa.array([p.id for p in pairs], pa.string()))
        n = sum(len(a) for a in ids)
    elif mode == "whole":
        pairs, _, _ = load_dataset_pairs(path, tokenizer, 1024, on_bad_row="skip")
        n = len(pairs)
    elif mode == "kto-whole":
        from prefcache.data.unpaired import load_unpaired

        items, _, _ = load_unpaired(path, tokenizer, 1024, on_bad_row="skip", unpair=True)
        n = len(items)
    else:  # store1 / store2 / kto-store1: what PairTask.load (UnpairedTask.load) and the first epoch do
        from prefcache.data.store import pair_rows, unpaired_rows
        from prefcache.model.tokenization import tokenizer_key
        from prefcache.training.state import epoch_order

        read = unpaired_rows if mode == "kto-store1" else pair_rows
        rows, _ = read(path, tokenizer, 1024, on_bad_row="skip", tokenizer_key=tokenizer_key(tokenizer),
                       folder=Path(path).parent / "stores")
        order = epoch_order(len(rows), 0, 0, 0, 1, rows.lengths(), 32)
        batch = [rows[i] for i in order[:8]]
        assert len(batch) == 8
        n = len(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "examples": n, "seconds": time.perf_counter() - t0, "baseline_mb": base, "peak_mb": peak,
            "data_mb": peak - base}


MODES = ("blocks", "whole", "store1", "store2", "kto-whole", "kto-store1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--whole-up-to", type=int, default=100_000,
                        help="measure the whole-read paths only up to N")
    parser.add_argument("--allocator", choices=("auto", "system"), default="auto",
                        help="auto: jemalloc when installed, as the CLI; system: glibc malloc")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--_measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._measure:
        print(json.dumps(measure(*args._measure)))
        return
    from prefcache.core.allocator import find_jemalloc

    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    lib = find_jemalloc() if args.allocator == "auto" else None
    if lib:
        env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD")) if x)
    print(f"allocator: {'jemalloc (' + lib + ')' if lib else 'system (glibc malloc)'}")
    with tempfile.TemporaryDirectory() as tmp:
        # examples: pairs, or for the kto modes the examples they are unpaired into (2 a pair)
        print(f"{'examples':>10} {'mode':>10} {'data-side peak RSS':>19} {'process peak':>13} {'seconds':>8}")
        # store2 maps the store store1 wrote (beside the data file, in the temporary folder)
        for n in args.pairs:
            path = Path(tmp) / f"pairs-{n}.parquet"
            make_parquet(path, n)
            for mode in args.modes:
                if mode.endswith("whole") and n > args.whole_up_to:
                    continue
                out = subprocess.run([sys.executable, __file__, "--_measure", str(path), mode], check=True,
                                     capture_output=True, text=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{r['examples']:>10,} {mode:>10} {r['data_mb']:>16,.0f} MB {r['peak_mb']:>10,.0f} MB {r['seconds']:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
