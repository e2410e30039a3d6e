"""Train a LoRA policy with DPO against a precomputed reference cache: no reference model is loaded.

    python examples/precompute_cache.py          # first: writes runs/example/data/ and runs/example/cache/
    python examples/train_from_cache.py          # 4 steps of 4 pairs, a quarter of the ids held out
    python examples/train_from_cache.py --steps 50 --loss sigmoid,sft --loss-weights 1,0.2 --overwrite

The cache's metadata decides max_length and truncation, and training refuses a cache made with another
tokenizer or chat template. `--finetune auto` picks QLoRA (LoRA on a 4-bit NF4 base) for a 4-bit cache and
LoRA otherwise, so the policy starts as the model that made the cache: rewards 0, loss ln 2 at step 0.
The same as the CLI:

    prefcache train --data DATA --cache CACHE --out OUT --finetune qlora --max-steps 4 --eval-fraction 0.25
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import prefcache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="runs/example/data/train.jsonl", help="the pairs the cache was made from")
    ap.add_argument("--cache", default="runs/example/cache", help="reference cache (examples/precompute_cache.py)")
    ap.add_argument("--out", default="runs/example/run", help="run directory: logs/, checkpoints/, run.json")
    ap.add_argument("--finetune", default="auto", choices=("auto", "lora", "qlora", "full"),
                    help="auto: qlora for a 4-bit cache, else lora")
    ap.add_argument("--loss", default="sigmoid", help="loss name(s), comma-separated (docs/losses.md)")
    ap.add_argument("--loss-weights", default=None, help="comma-separated weights [default: 1 each]")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--eval-fraction", type=float, default=0.25, help="share of the ids held out for eval")
    ap.add_argument("--overwrite", action="store_true", help="delete --out first if it holds a run")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    args = ap.parse_args()

    finetune = args.finetune
    if finetune == "auto":
        finetune = "qlora" if prefcache.inspect_cache(args.cache)["metadata"]["quantization"] == "4bit" else "lora"
    if args.overwrite and Path(args.out).exists():
        shutil.rmtree(args.out)
    elif (Path(args.out) / "checkpoints").exists() and not args.resume:
        raise SystemExit(f"{args.out} already holds a run: pass --overwrite to start again, or --resume")

    config = prefcache.TrainConfig(  # frozen and validated here: a bad option fails before any model loads
        data=args.data, cache=args.cache, out=args.out, finetune=finetune, loss=args.loss,
        loss_weights=args.loss_weights, beta=args.beta, lr=args.lr, max_steps=args.steps,
        batch_size=args.batch_size, warmup_steps=0, eval_fraction=args.eval_fraction, resume=args.resume)
    summary = prefcache.train(config)

    print(f"\n{finetune} run {summary['run']}: {summary['steps']} steps in {summary['seconds']:.1f}s")
    print("last train step:", json.dumps({k: round(v, 4) for k, v in summary["train"].items()}))
    if summary["eval"]:
        print("held-out eval:  ", json.dumps({k: round(v, 4) for k, v in summary["eval"].items()}))
    print(f"final checkpoint (a PEFT adapter): {summary['final_checkpoint']}")
    print(f"\nnext: python examples/query_rewards.py --cache {args.cache} --run {args.out}")


if __name__ == "__main__":
    main()
