"""Per-rank memory of the training state, unsharded (DDP) against ``--fsdp``, at 1, 2 and 4 processes.

    python benchmarks/bench_fsdp.py                           # hidden 1024, 8 layers (~145M params, ~550 MB fp32)
    python benchmarks/bench_fsdp.py --modes fsdp:2 ddp:2      # some modes only
    python benchmarks/bench_fsdp.py --hidden 512 --layers 4   # smaller and quicker (plumbing check)

What runs is prefcache's own training, ``prefcache.training.loop.train`` (the function ``prefcache train`` calls),
with full fine-tuning (``finetune="full"``), one optimizer step, in gloo processes launched by torchrun (one
process: no launcher, as a user runs it). It trains a random Llama-shaped model saved as an HF folder with the
embedded SmolLM2 tokenizer (vocab 49,152; tied embeddings, as SmolLM2), on the benchmark's seeded pairs
(benchmarks/data.py) against their fp32 cache made by ``prefcache.precompute``. So the module is the one the loop
builds: the kernel's ``LogProbModule`` over the policy, DDP-wrapped under torchrun, or sharded in place with
FSDP2's ``fully_shard`` (each decoder layer a unit, the root holding embeddings, final norm and head) with
``fsdp=True``; the optimizer is the loop's AdamW.

How it measures: a global optimizer step post-hook (torch's ``register_optimizer_step_post_hook``; nothing in
prefcache is patched) fires right after the loop's first ``optimizer.step()``, before ``zero_grad``, when
parameters, gradients and AdamW's state (exp_avg, exp_avg_sq, step) all exist. On each rank it sums the bytes
of the LOCAL tensors (a DTensor's ``to_local()``: this rank's shard) of the optimizer's parameters (with full
fine-tuning, every weight of the policy; tied weights once), their gradients and the optimizer state. It also
records the process's RSS at that moment and its peak RSS (``ru_maxrss``): whole-process figures, imported
libraries included, and for DDP they include what the tensor count does not see (DDP's gradient buckets, a
second gradient-sized buffer; the full model every rank loads before FSDP shards it shows in the peak). Then
the hook stops the run (an exception every rank raises at the same point): the checkpoint that would follow
is not part of the measurement. Each rank writes its figures; the table shows the largest of the ranks.

Targets (per-rank parameters + gradients + optimizer state, FSDP over DDP at the same number of ranks):
<= 0.6x at 2 ranks, <= 0.35x at 4. A benchmark, not a test: it prints MET / MISS and asserts nothing.
Every process runs on one thread (``OMP_NUM_THREADS=1``) with jemalloc preloaded when installed (as the CLI).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("ddp:1", "ddp:2", "ddp:4", "fsdp:2", "fsdp:4")  # kind:processes; ddp:1 is one plain process
TARGETS = {2: 0.6, 4: 0.35}  # FSDP's per-rank state over DDP's, at this many ranks
MB = 2**20


# ---------------------------------------------------------------- worker side (one process of one mode)

class Measured(Exception):
    """Raised by the step hook once a rank has written its figures: the run stops there, on every rank."""


def local_bytes(t) -> int:
    """Bytes this rank holds of ``t``: its shard for a DTensor (FSDP2), the whole tensor otherwise."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def state_bytes(optimizer) -> dict:
    """Bytes of the optimizer's parameters, their gradients and its state (all local to this rank)."""
    import torch

    params = list({id(p): p for g in optimizer.param_groups for p in g["params"]}.values())
    state = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return {"params": sum(map(local_bytes, params)), "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(map(local_bytes, state)), "n_params": len(params)}


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(spec: dict) -> None:
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from prefcache.training.loop import train

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", 0))

    def measure(optimizer, args, kwargs):
        figures = state_bytes(optimizer) | {"rss_mb": rss_mb(),
                                            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        Path(spec["results"], f"rank{rank}.json").write_text(json.dumps(figures))
        raise Measured

    register_optimizer_step_post_hook(measure)
    try:
        train(data=spec["data"], cache=spec["cache"], model=spec["model"], out=spec["out"], finetune="full",
              fsdp=spec["fsdp"], max_steps=1, batch_size=spec["batch_size"], progress=False)
    except Measured:
        return
    raise RuntimeError("the run ended without an optimizer step")


# ---------------------------------------------------------------- parent side

def make_model(path: Path, hidden: int, layers: int) -> int:
    """A random Llama of ``hidden`` x ``layers`` with SmolLM2's tokenizer (and vocab), saved; its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefcache.model.load import default_model, load_tokenizer

    tokenizer = load_tokenizer(default_model())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def free_port() -> int:
    """A port free now, for torchrun's rendezvous (a fixed one collides with another run on the machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, spec: dict, work: Path, env: dict) -> list[dict]:
    """One mode's run; every rank's figures."""
    kind, procs = mode.split(":")
    results = work / f"results-{kind}-{procs}"
    results.mkdir()
    spec = {**spec, "fsdp": kind == "fsdp", "results": str(results), "out": str(work / f"run-{kind}-{procs}")}
    worker_cmd = [str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    if procs == "1":
        cmd = [sys.executable, *worker_cmd]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", procs, "--master-port",
               str(free_port()), *worker_cmd]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    ranks = sorted(results.glob("rank*.json"))
    if res.returncode != 0 or len(ranks) != int(procs):
        raise RuntimeError(f"{mode} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return [json.loads(p.read_text()) for p in ranks]


def report(results: dict[str, list[dict]], n_params: int) -> str:
    def worst(mode: str, key: str) -> float:
        return max(r[key] for r in results[mode])

    def total(mode: str) -> float:
        return max(r["params"] + r["grads"] + r["optimizer"] for r in results[mode])

    lines = [f"{'mode':<7} {'ranks':>5} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'total MB':>9} "
             f"{'vs DDP':>7} {'target':>7} {'':>4} {'RSS at step':>12} {'peak RSS':>9}"]
    for mode, ranks in results.items():
        kind, procs = mode.split(":")
        ddp = f"ddp:{procs}" if f"ddp:{procs}" in results else "ddp:1" if "ddp:1" in results else None
        ratio = total(mode) / total(ddp) if ddp else float("nan")
        target = TARGETS.get(int(procs)) if kind == "fsdp" else None
        verdict = "" if target is None or not ddp else "MET" if ratio <= target else "MISS"
        lines.append(f"{kind.upper():<7} {procs:>5} {worst(mode, 'params') / MB:>10,.0f} {worst(mode, 'grads') / MB:>9,.0f} "
                     f"{worst(mode, 'optimizer') / MB:>9,.0f} {total(mode) / MB:>9,.0f} {ratio:>6.3f}x "
                     f"{f'<={target}x' if target else '':>7} {verdict:>4} {worst(mode, 'rss_mb'):>9,.0f} MB "
                     f"{worst(mode, 'peak_rss_mb'):>6,.0f} MB")
        spread = {r["params"] + r["grads"] + r["optimizer"] for r in ranks}
        if len(spread) > 1:
            lines.append(f"        (ranks differ: {min(spread) / MB:,.1f} to {max(spread) / MB:,.1f} MB; the largest shown)")
    lines.append(f"\n{n_params / 1e6:,.1f}M parameters, {n_params * 4 / MB:,.0f} MB in fp32; per rank the largest of the "
                 "ranks; 'vs DDP': total over DDP's at the same number of ranks (ddp:1 where that mode was not run). "
                 "RSS: the whole process (libraries included; DDP's gradient buckets too).")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="kind:processes")
    ap.add_argument("--hidden", type=int, default=1024, help="hidden size (a multiple of 128; MLP 2.75x, 64-wide heads)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers")
    ap.add_argument("--pairs", type=int, default=8, help="pairs in the data and the cache")
    ap.add_argument("--batch-size", type=int, default=1, help="pairs per process in the one step")
    ap.add_argument("--max-length", type=int, default=128, help="the cache's max_length, which train takes")
    ap.add_argument("--allocator", choices=("jemalloc", "glibc"), default="jemalloc")
    ap.add_argument("--json", default=None, help="also write every rank's figures here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    if max(int(m.split(":")[1]) for m in a.modes) * a.batch_size > a.pairs:
        ap.error("--pairs must cover --batch-size pairs on each process of the largest mode")

    sys.path.insert(0, str(HERE))
    from data import make_pairs, write_jsonl

    from prefcache.core.allocator import find_jemalloc
    from prefcache.reference.shards import precompute

    os.environ["TQDM_DISABLE"] = "1"  # no progress bars (transformers', precompute's) here or in the workers
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    env.pop("LD_PRELOAD", None)
    lib = find_jemalloc() if a.allocator == "jemalloc" else None
    if lib:
        env["LD_PRELOAD"] = lib
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        n_params = make_model(work / "model", a.hidden, a.layers)
        data = write_jsonl(work / "pairs.jsonl", make_pairs(a.pairs))
        precompute(data=str(data), out=str(work / "cache"), model=str(work / "model"), max_length=a.max_length,
                   quantize="fp32", progress=False)
        print(f"random Llama, hidden {a.hidden}, {a.layers} layers, vocab 49,152 (SmolLM2's tokenizer), tied embeddings: "
              f"{n_params / 1e6:,.1f}M parameters; full fine-tuning, fp32, AdamW, gloo, one step of {a.batch_size} "
              f"pair(s) per process, max_length {a.max_length}; 1 thread per process, allocator "
              f"{'jemalloc' if lib else 'glibc'}; set-up {time.perf_counter() - t0:.0f} s", flush=True)
        spec = {"data": str(data), "cache": str(work / "cache"), "model": str(work / "model"), "batch_size": a.batch_size}
        results = {}
        for mode in a.modes:
            t0 = time.perf_counter()
            results[mode] = launch(mode, spec, work, env)
            print(f"  {mode}: {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(report(results, n_params))
    if a.json:
        Path(a.json).write_text(json.dumps({"n_params": n_params, "results": results}, indent=2))


if __name__ == "__main__":
    main()
