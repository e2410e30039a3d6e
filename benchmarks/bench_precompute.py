"""Benchmark the reference-log-prob precompute pass: prefcache vs a naive full-logits pass vs TRL.

    python benchmarks/bench_precompute.py                               # 128 pairs of each shape, fp32, CPU, batch 8
    python benchmarks/bench_precompute.py --shape prompt                # prompt-heavy pairs only
    python benchmarks/bench_precompute.py --pairs 16 --max-length 128 --batch-size 4   # a quick check
    python benchmarks/bench_precompute.py --rounds 3                    # best of 3, round-robin (a shared machine)
    python benchmarks/bench_precompute.py --allocator both              # a table for glibc malloc and one for jemalloc
    python benchmarks/bench_precompute.py --quantize bf16 --device cuda --pairs 1024

A benchmark, not a timed test: it prints numbers and MET/MISS against the target, it asserts nothing.
Every contender scores the same pairs (benchmarks/data.py, seeded) with the same model (the embedded
SmolLM2-135M-Instruct), precision, batch size (pairs per forward, i.e. 2x sequences), max_length and
torch thread count, each in its own process (so its peak memory is its own), under the same allocator:

- prefcache: ``prefcache.precompute(...)`` (prefcache/reference/shards.py) at its defaults (prefix sharing: each
  prompt once, its completions packed after it), the real API path, writing a cache to a temp dir. Timed:
  its scoring (``score_shared`` / ``score_sequences``) plus its shard writing; not the model load or the
  tokenisation.
- unshared: the same with ``prefix_sharing=False`` (two sequences per pair: prefcache before prefix sharing).
- naive (not run unless named in --contenders): the same unshared ``precompute`` run (same tokenisation, de-duplication, length-sorted batches) with the
  log-prob kernel swapped for ``naive_token_logprobs`` (full [N, T, V] logits, fp32 log-softmax).
- trl: ``DPOTrainer(precompute_ref_log_probs=True)`` with ``precompute_ref_batch_size`` = the batch size,
  the model loaded in the same dtype, ``bf16=False`` (no autocast: fp32 runs fp32, bf16 a bf16 model) and
  the same max_length. Timed: its ``_precompute_ref_logps`` (data loading, forwards, writing its Arrow
  cache), which ``DPOTrainer.__init__`` runs; not the model load, the tokenisation or ``hash_module``.

Two data shapes (benchmarks/data.py, --shape): answer-heavy and prompt-heavy; one table each.
Printed: one table with pairs/s, tokens/s (real tokens: prompt + completion of both sequences of every
pair, the same count for all), peak memory, the padding share of the positions each contender computes
and the ratios to prefcache; the FLOP rate over the tokens each contender actually computes (2 x params x
computed tokens / s: prefix sharing computes a prompt once) next to the rate of plain matmuls of the model's
own shapes on this machine; and agreement: max |diff| of prefcache's summed log-probs vs the others.
Peak memory is the process's peak RSS during the timed phase (VmHWM, reset through /proc/self/clear_refs
when the phase starts); on a GPU also ``torch.cuda.max_memory_allocated`` over the phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
CONTENDERS = ("prefcache", "unshared", "naive", "trl")
DEFAULT_CONTENDERS = ("prefcache", "unshared", "trl")
LABELS = {"prefcache": "prefcache", "unshared": "prefcache unshared", "naive": "naive full-logits",
          "trl": "TRL DPOTrainer"}
# Targets: prefcache >= Nx TRL's pairs/s at the same batch size and precision, per data shape.
TARGET_SPEEDUP = {"answer": 2.0, "prompt": 3.0}


# ---------------------------------------------------------------- child side (one contender per process)

def _status_mb(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


class Phase:
    """Accumulates the timed phase: wall and CPU seconds, peak RSS (and CUDA peak) since its first start."""

    def __init__(self, device: str):
        self.device, self.wall, self.cpu, self.started = device, 0.0, 0.0, False
        self.rss_before = self.peak_rss = self.cuda_peak = float("nan")

    def __enter__(self):
        import torch

        if not self.started:
            self.started, self.rss_before = True, _status_mb("VmRSS")
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the load's peak is not the phase's
            except OSError:
                pass
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
        self._t, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated() / 2**20
        self.wall += time.perf_counter() - self._t
        self.cpu += time.process_time() - self._c
        self.peak_rss = _status_mb("VmHWM")

    def timed(self, fn):
        def wrapper(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)
        return wrapper


def _resident(model):
    """Read every weight once: safetensors loads are memory-mapped, so untouched weights are not yet resident
    and would be paged in during the timed phase, counted as the phase's memory (TRL's hash_module reads
    them all before its phase anyway)."""
    import torch

    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    return model


def _child(name: str, spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    phase = Phase(spec["device"])
    out: dict = {"name": name, "threads": torch.get_num_threads(), "load_start": os.getloadavg()[0]}
    if name == "trl":
        out.update(_trl_child(spec, phase))
    else:
        out.update(_prefcache_child(name, spec, phase))
    out.update(wall=phase.wall, cpu=phase.cpu, rss_before=phase.rss_before, peak_rss=phase.peak_rss,
               cuda_peak=phase.cuda_peak, load_end=os.getloadavg()[0])
    return out


def _prefcache_child(name: str, spec: dict, phase: Phase) -> dict:
    from prefcache.cache import store as pcache
    from prefcache.model import kernel as plogprobs
    from prefcache.model import load as pmodels
    from prefcache.model import packing as ppacking
    from prefcache.reference import scoring as pscoring
    from prefcache.reference import shards as pre

    if name == "naive":  # score_sequences imports the kernel at call time: swap in the full-logits one
        naive = plogprobs.naive_token_logprobs
        plogprobs.token_logprobs = lambda model, ids, att, comp, **_: naive(model, ids, att, comp)
    # precompute calls these by module global / class attribute, or imports them at call time, so
    # patching them here reaches it
    load_model = pmodels.load_model

    def resident_load_model(*args, **kwargs):
        model, info = load_model(*args, **kwargs)
        return _resident(model), info

    pmodels.load_model = resident_load_model
    pscoring.score_sequences = phase.timed(pscoring.score_sequences)
    ppacking.score_shared = phase.timed(ppacking.score_shared)  # precompute imports it at call time
    pcache.CacheWriter.write = phase.timed(pcache.CacheWriter.write)
    cache = Path(spec["work"]) / f"cache-{name}-{spec['tag']}"
    summary = pre.precompute(data=spec["data"], out=str(cache), quantize=spec["quantize"],
                             max_length=spec["max_length"], batch_size=spec["batch_size"], device=spec["device"],
                             progress=False, prefix_sharing=name == "prefcache")
    if summary["problems"]:
        raise RuntimeError(f"prefcache reported problems: {summary['problems']}")
    t = pcache.read_cache(cache, ["id", "chosen_logps", "rejected_logps"]).to_pydict()
    return {"end_to_end_s": summary["seconds"],
            "values": {i: (c, r) for i, c, r in zip(t["id"], t["chosen_logps"], t["rejected_logps"], strict=True)}}


def _trl_child(spec: dict, phase: Phase) -> dict:
    import logging

    import datasets
    import torch
    import transformers
    import trl
    from trl import DPOConfig, DPOTrainer

    from prefcache.data.pairs import load_rows
    from prefcache.model.load import default_model, hf_folder, load_tokenizer

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    folder, device = hf_folder(default_model()), spec["device"]
    dtype = torch.bfloat16 if spec["quantize"] == "bf16" else torch.float32
    model = _resident(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device))
    args = DPOConfig(output_dir=str(Path(spec["work"]) / "trl"), report_to="none", use_cpu=device == "cpu",
                     disable_tqdm=True, precompute_ref_log_probs=True, bf16=False,
                     precompute_ref_batch_size=spec["batch_size"], per_device_train_batch_size=spec["batch_size"],
                     max_length=spec["max_length"], truncation_mode="keep_start", dataloader_num_workers=0)
    DPOTrainer._precompute_ref_logps = phase.timed(DPOTrainer._precompute_ref_logps)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(load_rows(spec["data"])),
                         processing_class=load_tokenizer(default_model()))
    ds = trainer.train_dataset
    ids = list(ds["id"])
    return {"trl": trl.__version__, "batch_size": args.precompute_ref_batch_size, "max_length": args.max_length,
            "values": {i: (c, r) for i, c, r in zip(ids, ds["ref_chosen_logps"], ds["ref_rejected_logps"], strict=True)},
            "tokens": {i: [p, c, r] for i, p, c, r in zip(ids, ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], strict=True)}}


def _matmul_child(spec: dict) -> dict:
    """Plain F.linear on the model's own GEMM shapes (one layer's 7 projections, the output head) at a
    typical batch's token count, in the run's dtype: the best rate this machine gives such matmuls."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["quantize"] == "bf16" else torch.float32
    dev, (h, inter, kv, vocab, layers), m = spec["device"], spec["dims"], spec["batch_tokens"]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    x, xi = torch.randn(m, h, dtype=dtype, device=dev), torch.randn(m, inter, dtype=dtype, device=dev)
    layer = [(x, torch.randn(o, h, dtype=dtype, device=dev)) for o in (h, kv, kv, h, inter, inter)]
    layer.append((xi, torch.randn(h, inter, dtype=dtype, device=dev)))
    head = [(x, torch.randn(vocab, h, dtype=dtype, device=dev))]

    def best(ops, reps=8) -> tuple[float, float]:
        times = []
        for _ in range(reps + 2):
            sync()
            t = time.perf_counter()
            for a, w in ops:
                F.linear(a, w)
            sync()
            times.append(time.perf_counter() - t)
        return sum(2 * a.shape[0] * a.shape[1] * w.shape[0] for a, w in ops), min(times[2:])

    (lf, lt), (hf, ht) = best(layer), best(head)
    return {"m": m, "layer_gflops": lf / lt / 1e9, "head_gflops": hf / ht / 1e9,
            "model_gflops": (layers * lf + hf) / (layers * lt + ht) / 1e9}


# ---------------------------------------------------------------- parent side

def _run(kind: str, spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(spec["threads"]))
    env.pop("LD_PRELOAD", None)
    if spec["allocator"] == "jemalloc":
        env["LD_PRELOAD"] = JEMALLOC
    result = Path(spec["work"]) / f"result-{kind}-{spec['tag']}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--spec", json.dumps(spec),
           "--result", str(result)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"name": kind, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        return {"name": kind, "error": f"exit {proc.returncode}:\n{tail}"}
    return json.loads(result.read_text())


def _schedules(pairs, batch_size: int) -> dict:
    """Token counts of each contender's batching, from the tokenised pairs (no model needed)."""
    seqs = {}
    for p in pairs:
        for c in (p.chosen_ids, p.rejected_ids):
            seqs.setdefault(tuple(p.prompt_ids + c), len(p.prompt_ids))
    lens = sorted((len(s) for s in seqs), reverse=True)  # prefcache: unique sequences, longest first
    b = 2 * batch_size
    sorted_padded = sum(max(lens[i : i + b]) * len(lens[i : i + b]) for i in range(0, len(lens), b))
    trl_padded = 0  # TRL: dataset order, B pairs -> 2B rows padded to the batch's longest sequence
    for i in range(0, len(pairs), batch_size):
        group = pairs[i : i + batch_size]
        trl_padded += 2 * len(group) * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                           for p in group)
    real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    completion = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    # prefcache with prefix sharing: a row per prompt and its unique completions, `batch_size` rows a pass
    from prefcache.model.packing import group_by_prompt

    rows = sorted((len(pr) + sum(map(len, cs)) for pr, cs in group_by_prompt(
        [(list(s), n) for s, n in seqs.items()], 2 * max(map(len, seqs), default=1))), reverse=True)
    shared_padded = sum(max(rows[i : i + batch_size]) * len(rows[i : i + batch_size])
                        for i in range(0, len(rows), batch_size))
    unique_real = sum(map(len, seqs))
    # Tokens through the backbone without padding, and with it, per contender.
    computed = {"prefcache": sum(rows), "unshared": unique_real, "naive": unique_real, "trl": real}
    # Positions through the output head: prefcache's kernel projects completion positions only.
    unique_completion = sum(len(s) - n for s, n in seqs.items())
    head = {"prefcache": unique_completion, "unshared": unique_completion, "naive": unique_real, "trl": real}
    padded = {"prefcache": shared_padded, "unshared": sorted_padded, "naive": sorted_padded, "trl": trl_padded}
    return {"real": real, "completion": completion, "sorted_padded": sorted_padded, "trl_padded": trl_padded,
            "shared_padded": shared_padded, "computed": computed, "padded": padded, "head": head,
            "batch_tokens": max(1, round(sorted_padded / -(-len(lens) // b)))}


def _table(results: list[dict], n_pairs: int, real_tokens: int, gpu: bool, sched: dict) -> str:
    base = next((r for r in results if r["name"] == "prefcache" and "error" not in r), None)
    mem = (lambda r: r["cuda_peak"]) if gpu else (lambda r: r["peak_rss"])  # noqa: E731
    head = ["contender", "pairs/s", "tokens/s", "timed s", "CPU use", "peak RSS MB", "+RSS MB",
            *(["peak CUDA MB"] if gpu else []), "padding", "prefcache speed-up", "mem / prefcache"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([LABELS[r["name"]], "failed", *[""] * (len(head) - 2)])
            continue
        rows.append([LABELS[r["name"]], f"{n_pairs / r['wall']:.2f}", f"{real_tokens / r['wall']:.0f}",
                     f"{r['wall']:.1f}", f"{r['cpu'] / r['wall']:.2f}", f"{r['peak_rss']:.0f}",
                     f"{r['peak_rss'] - r['rss_before']:.0f}", *([f"{r['cuda_peak']:.0f}"] if gpu else []),
                     f"{1 - sched['computed'][r['name']] / sched['padded'][r['name']]:.1%}",
                     f"{r['wall'] / base['wall']:.2f}x" if base else "-",
                     f"{mem(r) / mem(base):.2f}x" if base else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = lambda cells: " | ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(head), "-+-".join("-" * w for w in widths), *map(line, rows)])


def _agreement(by: dict, pairs, max_length: int) -> list[str]:
    ref, lines = by.get("prefcache"), []
    if not ref:
        return ["  (prefcache failed: nothing to compare)"]
    for other in ("unshared", "naive", "trl"):
        if other not in by:
            continue
        a, b = ref["values"], by[other]["values"]
        common = sorted(set(a) & set(b))
        diffs = [(abs(a[i][k] - b[i][k]), i, side) for i in common for k, side in ((0, "chosen"), (1, "rejected"))]
        worst = max(diffs, default=(float("nan"), "-", "-"))
        mean = sum(d for d, *_ in diffs) / max(len(diffs), 1)
        lines.append(f"  prefcache vs {LABELS[other]:<17}: {len(common)}/{len(a)} pairs, max |diff| of summed "
                     f"log-probs {worst[0]:.2e} nats (pair {worst[1]}, {worst[2]}), mean {mean:.2e}")
        if "tokens" in by[other]:  # TRL stores untruncated ids and truncates (keep_start) in its collator
            mine = {p.id: [p.prompt_ids, p.chosen_ids, p.rejected_ids] for p in pairs}
            cut = lambda t: [t[0], t[1][: max_length - len(t[0])], t[2][: max_length - len(t[0])]]  # noqa: E731
            same = sum(mine.get(i) == cut(by[other]["tokens"][i]) for i in common)
            lines.append(f"      token ids (prompt, chosen, rejected; after max_length) identical for "
                         f"{same}/{len(common)} pairs")
    return lines


def _contest(names: list[str], spec: dict, rounds: int, timeout: float) -> list[dict]:
    """Every contender ``rounds`` times, round-robin (a busy spell on a shared machine hits all alike);
    the fastest run of each is kept, with the timed seconds of all its runs under "walls"."""
    best: dict[str, dict] = {}
    for rnd in range(rounds):
        for n in names:
            r = _run(n, {**spec, "tag": f"{spec['allocator']}-{rnd}"}, timeout)
            print(f"  [{spec['allocator']}] round {rnd + 1}: {LABELS[n]:<17} " + (
                f"failed: {r['error']}" if "error" in r else f"{r['wall']:.1f} s timed"), flush=True)
            walls = best.get(n, {}).get("walls", []) + [r.get("wall")]
            if n not in best or "error" in best[n] or ("error" not in r and r["wall"] < best[n]["wall"]):
                best[n] = r
            best[n]["walls"] = walls
    return [best[n] for n in names]


def _report(alloc: str, results: list[dict], mm: dict, pairs, sched: dict, spec: dict, args) -> None:
    by = {r["name"]: r for r in results if "error" not in r}
    name = f"jemalloc (LD_PRELOAD={JEMALLOC})" if alloc == "jemalloc" else "glibc malloc"
    print(f"\n[{spec['shape']}-heavy pairs] allocator: {name}\n"
          + _table(results, len(pairs), sched["real"], args.device.startswith("cuda"), sched))
    print("  pairs/s, tokens/s: over the timed phase only (see the docstring); prefcache speed-up = contender's "
          "timed s / prefcache's.\n  CPU use = process CPU s / wall s in the phase (the thread count is the "
          "ceiling; less = waiting, or a busy machine).\n  peak RSS = the process's peak during the phase; +RSS = "
          "that peak minus the RSS when the phase began (weights loaded and read once, data tokenised).")
    if "trl" in by:
        r = by["trl"]
        print(f"  TRL {r['trl']}: precompute batch {r['batch_size']} pairs, max_length {r['max_length']}, no autocast")
    if args.rounds > 1:
        print("  timed s per round: " + "; ".join(f"{LABELS[r['name']]} " + ", ".join(
            "-" if w is None else f"{w:.1f}" for w in r["walls"]) for r in results))
    print("  1-min load average around each contender: " + ", ".join(
        f"{LABELS[r['name']]} {r['load_start']:.1f}->{r['load_end']:.1f}" for r in by.values()))
    if "prefcache" in by and "trl" in by:
        speedup, target = by["trl"]["wall"] / by["prefcache"]["wall"], TARGET_SPEEDUP[spec["shape"]]
        print(f"target: prefcache pairs/s >= {target:.0f}x TRL's at the same batch size and precision: "
              f"{'MET' if speedup >= target else 'MISS'} ({speedup:.2f}x)")
    if "prefcache" in by and "unshared" in by:
        p, u = by["prefcache"], by["unshared"]
        print(f"target: no slower and no more memory than without prefix sharing: time "
              f"{'MET' if p['wall'] <= u['wall'] else 'MISS'} ({p['wall'] / u['wall']:.2f}x), peak RSS "
              f"{'MET' if p['peak_rss'] <= u['peak_rss'] else 'MISS'} ({p['peak_rss'] / u['peak_rss']:.2f}x)")

    print("agreement (summed completion log-probs, per pair and side):")
    print("\n".join(_agreement(by, pairs, args.max_length)))

    h, inter, kv, vocab, layers = spec["dims"]
    body = layers * (h * (2 * h + 2 * kv) + 3 * h * inter)  # every linear layer of the backbone
    print(f"FLOP rates (2 x ({body / 1e6:.1f}M backbone params x the tokens each contender computes + {vocab * h / 1e6:.1f}M "
          "head params x the positions it projects) / timed s; padding and attention scores not counted):")
    if "error" in mm:
        print(f"  plain matmul reference failed: {mm['error']}")
    else:
        print(f"  plain matmul, the model's shapes ({args.quantize}, F.linear, {mm['m']} tokens x {h}, best of 8): "
              f"one layer's q,k,v,o,gate,up,down {mm['layer_gflops']:.1f} GFLOP/s, head {h}->{vocab} "
              f"{mm['head_gflops']:.1f} GFLOP/s; {layers} layers + head: {mm['model_gflops']:.1f} GFLOP/s")
    for r in by.values():
        achieved = 2 * (body * sched["computed"][r["name"]] + vocab * h * sched["head"][r["name"]]) / r["wall"] / 1e9
        share = f" = {achieved / mm['model_gflops']:.0%} of the plain matmul rate" if "error" not in mm else ""
        print(f"  {LABELS[r['name']]:<17}: {achieved:6.1f} GFLOP/s{share}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per forward (2x sequences), all contenders")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--quantize", default="fp32", choices=("fp32", "bf16"), help="precision of every contender")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--allocator", default="auto", choices=("auto", "glibc", "jemalloc", "both"),
                    help="CPU allocator for every contender; auto = jemalloc when installed, else glibc; "
                    "both = a table for each")
    ap.add_argument("--contenders", default=",".join(DEFAULT_CONTENDERS), help=f"from {', '.join(CONTENDERS)}")
    ap.add_argument("--shape", default="both", choices=("answer", "prompt", "both"),
                    help="answer-heavy or prompt-heavy pairs (benchmarks/data.py), or a table for each")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (and OMP_NUM_THREADS), all")
    ap.add_argument("--standard", action="store_true", help="plain-text pairs instead of chat messages")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per contender")
    ap.add_argument("--rounds", type=int, default=1, help="run every contender this many times, keep the fastest")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.spec)
        res = _matmul_child(spec) if args.child == "matmul" else _child(args.child, spec)
        Path(args.result).write_text(json.dumps(res))
        return

    names = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := set(names) - set(CONTENDERS):
        ap.error(f"unknown contenders {sorted(unknown)}; choose from {', '.join(CONTENDERS)}")
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed (pip install -e .[bench]): skipping the TRL contender")
        names = [n for n in names if n != "trl"]
    have_jemalloc = Path(JEMALLOC).exists()
    allocators = {"auto": ["jemalloc" if have_jemalloc else "glibc"], "both": ["glibc", "jemalloc"]}.get(
        args.allocator, [args.allocator])
    if "jemalloc" in allocators and not have_jemalloc:
        ap.error(f"{JEMALLOC} not found (apt-get install libjemalloc2)")

    sys.path.insert(0, str(HERE))
    from data import SHAPES, warn_if_busy, write_jsonl

    from prefcache.data.pairs import load_dataset_pairs
    from prefcache.model.load import default_model, hf_folder, load_tokenizer

    work = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    source = default_model()
    cfg = json.loads((hf_folder(source) / "config.json").read_text())
    h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    t_start = time.perf_counter()
    warn_if_busy()
    for shape in (("answer", "prompt") if args.shape == "both" else (args.shape,)):
        data = write_jsonl(work / f"pairs-{shape}.jsonl",
                           SHAPES[shape](args.pairs, args.seed, conversational=not args.standard))
        pairs, _, _ = load_dataset_pairs(data, load_tokenizer(source), args.max_length)
        sched = _schedules(pairs, args.batch_size)
        spec = {"data": str(data), "work": str(work / shape), "quantize": args.quantize,
                "max_length": args.max_length, "batch_size": args.batch_size, "device": args.device,
                "threads": args.threads, "dims": [h, inter, kv, vocab, layers], "batch_tokens": sched["batch_tokens"],
                "shape": shape}
        Path(spec["work"]).mkdir(parents=True, exist_ok=True)
        print(f"\nprecompute benchmark, {shape}-heavy: {len(pairs)} pairs ({'standard' if args.standard else 'chat'} "
              f"format, seed {args.seed}), SmolLM2-135M-Instruct {args.quantize} on {args.device}, batch "
              f"{args.batch_size} pairs ({2 * args.batch_size} sequences), max_length {args.max_length}, torch threads "
              f"{args.threads} of {os.cpu_count()} CPUs, allocator {'/'.join(allocators)}, load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print(f"tokens: {sched['real']} real (prompt + completion, both sequences of each pair), {sched['completion']} "
              f"completion; through the backbone (padded): prefcache {sched['computed']['prefcache']} "
              f"({sched['shared_padded']}, prompts once, length-sorted rows), unshared/naive "
              f"{sched['computed']['unshared']} ({sched['sorted_padded']}, length-sorted), TRL {sched['real']} "
              f"({sched['trl_padded']}, dataset order)", flush=True)
        for alloc in allocators:
            results = _contest(names, {**spec, "allocator": alloc}, args.rounds, args.timeout)
            mm = _run("matmul", {**spec, "allocator": alloc, "tag": "mm"}, args.timeout)
            _report(alloc, results, mm, pairs, sched, spec, args)
    print(f"\nwork dir {work} (data, caches); total {time.perf_counter() - t_start:.0f} s, load average now "
          f"{os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
