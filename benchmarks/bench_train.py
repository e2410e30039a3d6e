"""Peak memory and seconds per optimizer step: prefcache's trainer against TRL's DPOTrainer in its three modes.

    python benchmarks/bench_train.py                                  # SmolLM2-135M, batch 4, max_length 256, both shapes
    python benchmarks/bench_train.py --shape prompt                   # prompt-heavy pairs only
    python benchmarks/bench_train.py --pairs-per-step 2 --max-length 128 --warmup 1 --steps 2   # a quick check
    python benchmarks/bench_train.py --rounds 3                       # best of 3, round-robin (a shared machine)
    python benchmarks/bench_train.py --tiny --steps 3                 # a tiny random Llama (plumbing check only)
    python benchmarks/bench_train.py --device cuda --batch-size 8     # on a GPU: bf16, CUDA peak memory

Every mode trains the same model (the embedded SmolLM2-135M-Instruct, or --model / --tiny) on the same
pairs (benchmarks/data.py's seeded conversational pairs, answer-heavy and prompt-heavy: --shape) in the
same order (prefcache's seeded, length-grouped epoch order; TRL reads the rows in that order with its
sequential sampler), so step k sees the same pairs everywhere. Shared settings: a new LoRA adapter (r=16,
alpha=32, dropout 0, every linear layer but the head), the same dtype (fp32 on CPU; on a GPU a bf16 base
with bf16 autocast), batch size, max length (keep_start), sigmoid DPO loss with beta 0.1, AdamW (torch,
lr 1e-5, no weight decay, constant LR, no warm-up), gradient clipping at 1.0 and the same torch thread
count / OMP_NUM_THREADS. Activation checkpointing is each tool's default (both: on, non-reentrant), or
off for all with --no-checkpointing. The modes:

- prefcache      : ``prefcache.train`` (prefcache/training/loop.py) at its defaults (activation checkpointing,
                   prefix sharing, length-grouped batches): the policy only; the reference log-probs
                   come from a cache made beforehand by ``prefcache.precompute`` (a one-off pass, reported
                   on its own line);
- prefcache_2seq : the same with two sequences per pair and random batches (prefcache before prefix
                   sharing and length grouping, with activation checkpointing: the configuration the
                   README's earlier figures measured);
- trl_ref_model  : DPOTrainer with a separately loaded reference model;
- trl_peft_ref   : DPOTrainer with no ref_model: the reference is the policy with its adapter disabled
                   (a second, no-grad forward per step);
- trl_precompute : DPOTrainer with precompute_ref_log_probs=True (a reference pass in its __init__).

Each mode runs in its own subprocess. Memory: on CPU the process's peak RSS (ru_maxrss), and that peak
minus the RSS just before the first weights load ("over pre-load": the models, optimizer, activations and
what the libraries allocate lazily, without the imported libraries and the tokenizer); on a GPU
torch.cuda.max_memory_allocated. Step time: the mean over --steps optimizer steps after --warmup
steps, from step-end timestamps (prefcache: its step log's time_s; TRL: a callback's on_step_end).
Also printed: the padding share of the token positions each mode computes (prefcache: its steps log;
TRL: from its batches, 2 x batch rows padded to the longest sequence) and the FLOP rate over the tokens
each mode actually computes (6 x params x policy tokens, plus 2 x params x tokens for a reference forward
where the mode runs one, per second; padding not counted) next to plain matmuls of the model's shapes.
Targets: peak memory <= 0.5x trl_peft_ref (TRL's leanest mode) at each tool's defaults; on prompt-heavy
pairs seconds per step <= 0.5x TRL's fastest mode; on answer-heavy pairs no slower and no more memory
than prefcache_2seq. A benchmark, not a test: it prints MET / MISS and asserts nothing.
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

HERE = Path(__file__).resolve().parent
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MODES = ("prefcache", "prefcache_2seq", "trl_ref_model", "trl_peft_ref", "trl_precompute")
TRL_MODES = MODES[2:]
MARK = "BENCH_RESULT "
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
BETA, LR, MAX_GRAD_NORM = 0.1, 1e-5, 1.0


# ---------------------------------------------------------------- worker side (one mode per process)

def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_precompute(spec: dict) -> dict:
    from prefcache.reference.shards import precompute

    t0 = time.perf_counter()
    precompute(data=spec["data"], out=spec["cache"], model=spec["model"], max_length=spec["max_length"],
               quantize="fp32" if spec["device"] == "cpu" else "bf16", batch_size=spec["batch_size"],
               device=spec["device"], progress=False)
    return {"wall_s": time.perf_counter() - t0}


def run_prefcache(spec: dict, mode: str = "prefcache") -> dict:
    import polars as pl

    import prefcache.model.policy as ppolicy
    import prefcache.training.state as pstate
    from prefcache.training.loop import train

    base: list[float] = []
    load_policy = ppolicy.load_policy  # wrapped where train() looks it up: the RSS before the weights

    def measured_load_policy(*args, **kwargs):
        base.append(rss_mb())
        return load_policy(*args, **kwargs)

    ppolicy.load_policy = pstate.load_policy = measured_load_policy
    out = Path(spec["work"]) / f"{mode}-run"
    options = {} if spec["checkpointing"] else {"gradient_checkpointing": False}  # else: the default (on)
    if mode == "prefcache_2seq":
        options = {"gradient_checkpointing": spec["checkpointing"], "prefix_sharing": False, "group_by_length": False}
    t0 = time.perf_counter()
    train(data=spec["data"], cache=spec["cache"], out=str(out), model=spec["model"], max_steps=spec["total_steps"],
          batch_size=spec["batch_size"], max_length=spec["max_length"], truncation="keep_start", lr=LR,
          scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, loss=("sigmoid",),
          beta=BETA, finetune="lora", lora_r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
          lora_target="all-linear", bf16=True, device=spec["device"], progress=False, seed=spec["seed"], log_every=1,
          flush_every=10_000, **options)
    wall = time.perf_counter() - t0
    # time_s: seconds since the run started, logged as each step ends
    steps = pl.read_parquet(f"{out}/logs/steps-*.parquet").filter(pl.col("split") == "train").sort("step")
    return {"step_ends": steps["time_s"].to_list(), "wall_s": wall, "base_mb": base[0],
            "padding": steps["padding_share"].to_list()}


def run_trl(spec: dict, mode: str) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from prefcache.model.vision import lora_exclude  # LoRA on the language model only, as prefcache's default

    vision = spec.get("vision", False)  # benchmarks/bench_vlm.py: a vision-language model and image rows

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if spec["device"].startswith("cuda"):
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    gpu = spec["device"] != "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if vision:
        from transformers import AutoModelForImageTextToText as Auto
        from transformers import AutoProcessor

        tok = AutoProcessor.from_pretrained(spec["model"])  # TRL takes a processor as its processing class
    else:
        Auto, tok = AutoModelForCausalLM, AutoTokenizer.from_pretrained(spec["model"])
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token  # as prefcache.model.load.load_tokenizer
    base = rss_mb()  # before the weights, as for prefcache
    model = Auto.from_pretrained(spec["model"], dtype=dtype)
    ref = Auto.from_pretrained(spec["model"], dtype=dtype) if mode == "trl_ref_model" else None
    # The rows in prefcache's training order (TRL needs no ids: it joins nothing), read sequentially.
    rows = [json.loads(line) for line in Path(spec["trl_data"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows)
    if vision:  # image paths -> PIL images, decoded on access, as a datasets Image column gives TRL's collator
        dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image()))
    args = DPOConfig(
        output_dir=str(Path(spec["work"]) / f"trl-{mode}"), per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, max_steps=spec["total_steps"], learning_rate=LR, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
        logging_steps=10_000, save_strategy="no", report_to="none", bf16=gpu, use_cpu=not gpu,
        **({} if spec["checkpointing"] else {"gradient_checkpointing": False}),  # else TRL's default (on)
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_length=spec["max_length"], truncation_mode="keep_start", beta=BETA, loss_type="sigmoid",
        seed=spec["seed"], precompute_ref_log_probs=mode == "trl_precompute", train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      target_modules="all-linear", task_type="CAUSAL_LM", exclude_modules=lora_exclude(model))
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset,
                         processing_class=tok, peft_config=lora, callbacks=[StepClock()])
    setup_s = time.perf_counter() - t0  # tokenisation, and for trl_precompute the reference pass
    start = time.perf_counter()
    trainer.train()
    return {"step_ends": [e - start for e in ends], "setup_s": setup_s, "wall_s": time.perf_counter() - t0,
            "base_mb": base}


def worker(mode: str, spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    if mode == "precompute":
        result = run_precompute(spec)
    elif mode == "matmul":
        sys.path.insert(0, str(HERE))
        from bench_precompute import _matmul_child

        result = _matmul_child(spec)
    elif mode.startswith("prefcache"):
        result = run_prefcache(spec, mode)
    else:
        result = run_trl(spec, mode)
    result["peak_mb"] = peak_memory_mb(spec["device"])
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side

def step_seconds(ends: list[float], warmup: int) -> float:
    """Mean seconds of the steps after the first ``warmup`` ones (step-end timestamps)."""
    timed = ends[warmup - 1 :] if warmup else [0.0, *ends]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def launch(mode: str, spec: dict, env: dict, script: str = __file__) -> dict:
    """Run ``script --worker mode`` (this file's worker, or another benchmark's) in its own process."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", mode, "--spec", json.dumps(spec)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith(MARK)]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} failed (exit {res.returncode}):\n{(res.stdout + res.stderr)[-4000:]}")
    return json.loads(lines[-1][len(MARK):])


def step_tokens(pairs, order: list[int], batch: int, shared: bool) -> list[tuple[int, int]]:
    """(real tokens computed, token positions incl. padding) per step of ``batch`` pairs in ``order``:
    packed rows [prompt | chosen | rejected], or two sequences per pair padded to the batch's longest."""
    out = []
    for s in range(0, len(order), batch):
        group = [pairs[i] for i in order[s : s + batch]]
        if shared:
            lens = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in group]
            out.append((sum(lens), len(group) * max(lens)))
        else:
            lens = [len(p.prompt_ids) + len(c) for p in group for c in (p.chosen_ids, p.rejected_ids)]
            out.append((sum(lens), len(lens) * max(lens)))
    return out


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return [line(head), *map(line, rows)]


def worker_env(threads: int, allocator: str) -> dict:
    """The environment of every contender's process: the same thread count and allocator, hub offline, this
    checkout's prefcache."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1",
           # this checkout's prefcache, whichever one an editable install points at
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    env.pop("LD_PRELOAD", None)
    if allocator == "jemalloc":
        env["LD_PRELOAD"] = JEMALLOC
    return env


def report(results: dict, spec: dict, tokens: dict, mm: dict) -> str:
    gpu = spec["device"].startswith("cuda")
    p = results["prefcache"]
    above = lambda r: r["peak_mb"] - (0.0 if gpu else r["base_mb"])  # noqa: E731
    timed = slice(spec["warmup"], spec["total_steps"])
    head = ["mode", "peak CUDA MB" if gpu else "peak RSS MB", *([] if gpu else ["over pre-load MB"]), "s/step",
            "padding", "GFLOP/s", "mem prefcache/x", *([] if gpu else ["(over pre-load)"]), "time prefcache/x"]
    rows = []
    for mode in MODES:
        r = results[mode]
        steps = tokens[mode][timed]
        pad = (sum(r["padding"][timed]) / len(r["padding"][timed]) if "padding" in r
               else 1 - sum(t for t, _ in steps) / sum(n for _, n in steps))
        flops = 6 + (2 if mode in ("trl_ref_model", "trl_peft_ref") else 0)  # x params x token, per step
        r["gflops"] = flops * spec["params"] * sum(t for t, _ in steps) / len(steps) / r["s_per_step"] / 1e9
        r["padding_share"] = pad
        rows.append([mode, f"{r['peak_mb']:.0f}", *([] if gpu else [f"{above(r):.0f}"]), f"{r['s_per_step']:.3f}",
                     f"{pad:.1%}", f"{r['gflops']:.1f}", f"{p['peak_mb'] / r['peak_mb']:.2f}",
                     *([] if gpu else [f"{above(p) / above(r):.2f}"]), f"{p['s_per_step'] / r['s_per_step']:.2f}"])
    lines = [f"[{spec['shape']}-heavy pairs]", *table(head, rows)]
    pre = results["precompute"]
    lines.append(f"one-off: prefcache precompute of {spec['pairs']} pairs in its own process {pre['wall_s']:.1f} s "
                 f"(peak {pre['peak_mb']:.0f} MB); trl_precompute's DPOTrainer() incl. its reference pass "
                 f"{results['trl_precompute']['setup_s']:.1f} s")
    if "error" not in mm:
        lines.append(f"plain matmul of the model's shapes ({mm['m']} tokens): {mm['model_gflops']:.1f} GFLOP/s; "
                     "GFLOP/s above: (6, or 8 with a reference forward) x params x real tokens per step / s")
    peft = results["trl_peft_ref"]
    fastest = min(TRL_MODES, key=lambda m: results[m]["s_per_step"])
    checks = [("peak memory <= 0.5 x trl_peft_ref (TRL's leanest)", p["peak_mb"] <= 0.5 * peft["peak_mb"],
               p["peak_mb"] / peft["peak_mb"])]
    if spec["shape"] == "prompt":
        f = results[fastest]["s_per_step"]
        checks.append((f"s/step <= 0.5 x TRL's fastest mode ({fastest})", p["s_per_step"] <= 0.5 * f, p["s_per_step"] / f))
    else:
        t = results["prefcache_2seq"]
        checks += [("s/step no slower than prefcache_2seq", p["s_per_step"] <= t["s_per_step"],
                    p["s_per_step"] / t["s_per_step"]),
                   ("peak memory no higher than prefcache_2seq", p["peak_mb"] <= t["peak_mb"], p["peak_mb"] / t["peak_mb"])]
    lines += [f"  {'MET ' if ok else 'MISS'} {name} ({ratio:.2f}x)" for name, ok, ratio in checks]
    if not gpu:
        lines.append(f"  (peak over the pre-load RSS vs trl_peft_ref: {above(p) / above(peft):.2f}x)")
    return "\n".join(lines)


def run_shape(shape: str, a, model: str, work: Path, env: dict, tokenizer) -> dict:
    from data import SHAPES, write_jsonl

    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.training.loop import epoch_order

    total = a.warmup + a.steps
    rows = SHAPES[shape](total * a.batch_size, seed=a.seed, conversational=True)  # one epoch: every pair once
    data = write_jsonl(work / f"prefs-{shape}.jsonl", rows)
    pairs, _, _ = load_dataset_pairs(data, tokenizer, a.max_length)
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    order = epoch_order(len(rows), a.seed, 0, 0, 1, lengths, a.batch_size)  # prefcache's first-epoch order
    plain = epoch_order(len(rows), a.seed, 0, 0, 1)  # prefcache_2seq: random batches
    tokens = {"prefcache": step_tokens(pairs, order, a.batch_size, True),
              "prefcache_2seq": step_tokens(pairs, plain, a.batch_size, False)}
    tokens |= {m: step_tokens(pairs, order, a.batch_size, False) for m in TRL_MODES}
    trl_data = write_jsonl(work / f"prefs-{shape}-trl-order.jsonl",
                           [{k: v for k, v in rows[i].items() if k != "id"} for i in order])
    cfg = json.loads((Path(model) / "config.json").read_text())
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    spec = {"model": model, "data": str(data), "trl_data": str(trl_data), "cache": str(work / f"cache-{shape}"),
            "work": str(work / shape), "batch_size": a.batch_size, "max_length": a.max_length, "total_steps": total,
            "warmup": a.warmup, "seed": a.seed, "threads": a.threads, "checkpointing": a.checkpointing,
            "device": a.device, "pairs": len(rows), "shape": shape, "quantize": "fp32" if a.device == "cpu" else "bf16",
            "params": layers * (h * (2 * h + 2 * kv) + 3 * h * inter) + vocab * h, "dims": [h, inter, kv, vocab, layers],
            "batch_tokens": max(n for _, n in tokens["prefcache_2seq"])}
    print(f"\n{shape}-heavy: {len(rows)} pairs, median prompt {sorted(len(p.prompt_ids) for p in pairs)[len(pairs) // 2]}"
          f" tokens, median answer {sorted(len(p.chosen_ids) for p in pairs)[len(pairs) // 2]}; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = {"precompute": launch("precompute", spec, env)}
    for rnd in range(a.rounds):  # round-robin, so a busy spell on a shared machine hits every mode alike
        round_spec = {**spec, "work": str(work / shape / f"round-{rnd}")}
        for mode in MODES:
            t = time.perf_counter()
            r = launch(mode, round_spec, env)
            r["s_per_step"] = step_seconds(r["step_ends"], a.warmup)
            r["rounds"] = results.get(mode, {}).get("rounds", []) + [r["s_per_step"]]
            if mode not in results or r["s_per_step"] < results[mode]["s_per_step"]:
                results[mode] = r  # the fastest round (its memory too: the peaks hardly vary)
            results[mode]["rounds"] = r["rounds"]
            print(f"  round {rnd + 1}: {mode:<15} peak {r['peak_mb']:7.0f} MB  {r['s_per_step']:7.3f} s/step  "
                  f"(process {time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    try:
        mm = launch("matmul", spec, env)
    except RuntimeError as e:
        mm = {"error": str(e)}
    print(report(results, spec, tokens, mm))
    if a.rounds > 1:
        print("s/step per round: " + "; ".join(f"{m} " + ", ".join(f"{x:.2f}" for x in results[m]["rounds"])
                                              for m in MODES))
    return {"spec": spec, "results": results, "matmul": mm}


def parse_or_work(ap: argparse.ArgumentParser, worker) -> argparse.Namespace | None:
    """Add the options every mode shares, and parse. In a worker process run ``worker(mode, spec)`` and return
    None; in the parent check that TRL is there and return the options."""
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads and OMP_NUM_THREADS, all modes")
    ap.add_argument("--rounds", type=int, default=1, help="run every mode this many times, keep the fastest")
    ap.add_argument("--allocator", choices=("jemalloc", "glibc"), default="jemalloc")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, json.loads(a.spec))
        return None
    try:
        import trl  # noqa: F401
    except ImportError:
        ap.error("trl is not installed: pip install -e .[bench]")
    return a


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder or .gguf [default: the embedded SmolLM2-135M-Instruct]")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (quick plumbing check)")
    ap.add_argument("--shape", default="both", choices=("answer", "prompt", "both"),
                    help="answer-heavy or prompt-heavy pairs (benchmarks/data.py), or a table for each")
    ap.add_argument("--batch-size", "--pairs-per-step", dest="batch_size", type=int, default=4,
                    help="pairs per optimizer step (no gradient accumulation)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=2, help="steps run before the timed ones")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                    help="activation checkpointing off in every mode (both tools turn it on by default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    a = parse_or_work(ap, worker)
    if a is None:
        return

    sys.path.insert(0, str(HERE))
    from data import warn_if_busy

    from prefcache.model.load import default_model, hf_folder, load_tokenizer, resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    if a.tiny:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import make_tiny_model

        model = str(make_tiny_model(work / "tiny", load_tokenizer(default_model())))
    else:
        model = str(hf_folder(resolve_model(a.model) if a.model else default_model()))
    tokenizer = load_tokenizer(resolve_model(model))
    if a.allocator == "jemalloc" and not Path(JEMALLOC).exists():
        print(f"{JEMALLOC} not found (apt-get install libjemalloc2): using glibc malloc")
        a.allocator = "glibc"
    env = worker_env(a.threads, a.allocator)
    print(f"model {model}\nbatch {a.batch_size} pairs, max_length {a.max_length}, LoRA r={LORA['r']} "
          f"alpha={LORA['alpha']} all-linear, {'fp32' if a.device == 'cpu' else 'bf16'}, activation checkpointing "
          f"{'each tool default (on)' if a.checkpointing else 'off'}, {a.threads} threads, {a.warmup} warm-up + "
          f"{a.steps} timed steps, device {a.device}, allocator {a.allocator}, load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores", flush=True)
    warn_if_busy()
    t0 = time.perf_counter()
    out = {shape: run_shape(shape, a, model, work, env, tokenizer)
           for shape in (("answer", "prompt") if a.shape == "both" else (a.shape,))}
    print(f"\nload average after: {os.getloadavg()[0]:.1f} (other work on the machine slows every mode); "
          f"total {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
