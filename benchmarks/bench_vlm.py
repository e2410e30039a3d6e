"""The vision-language preference shape: prefcache's precompute and train against TRL 1.16's DPOTrainer, whose
vision path has no precompute (it refuses ``precompute_ref_log_probs`` on image data).

    python benchmarks/bench_vlm.py                     # 32 pairs, batch 4, 256 image tokens a pair: ~4-9 min
    python benchmarks/bench_vlm.py --quick             # 4 pairs, batch 2, 1 warm-up + 1 timed step: < 3 min
    python benchmarks/bench_vlm.py --image-size 192    # 576 image tokens a pair
    python benchmarks/bench_vlm.py --rounds 3          # best of 3, round-robin (a shared machine)
    python benchmarks/bench_vlm.py --trl-only          # TRL's side alone (its reference pass and its two modes)

The model: a random LLaVA-style VLM built by tests/vlm_models.py's ``make_tiny_vlm`` (SmolLM2's tokenizer and
chat template with an ``<image>`` token). Vision tower: CLIP, 128x128 pixels in 8x8 patches (``--image-size``,
``--patch-size``): (128 / 8)^2 = 256 image tokens a picture, 4 layers of width 128. Language model: a random
Llama of width 384 (``--hidden``), 6 layers (``--layers``), MLP 1024, 6 query and 2 key-value heads, SmolLM2's
49k vocabulary with untied embeddings and head: ~48M parameters in all, ~10M of them in the decoder layers, big
enough that the forward and backward passes, not Python, are the time. The data: tests/vlm_models.py's
``vision_rows`` (TRL's vision format: a chat prompt with one image part and a short question, one PNG per row)
with ~30-token answers (``--answer-words``), so a pair is ~275 prompt tokens, 256 of them the image's, and two
~30-token completions: the image is most of each sequence.

Every contender runs in its own process on the same pairs, model, precision (fp32 on CPU, no autocast), batch
size, max_length (keep_start), thread count and allocator (tools as bench_train.py's and bench_precompute.py's):

- reference pass, per pair:
  - prefcache   : ``prefcache.precompute(data=..., out=..., model=<the VLM folder>, quantize="fp32",
                  batch_size=B)``, the public API at its defaults. Timed as bench_precompute.py times it: its
                  scoring and shard writing (not the model load, reading the images or tokenising); its
                  whole call (``seconds`` of its summary) is printed beside it.
  - TRL         : ``DPOTrainer.compute_ref_log_probs`` (the reference forward ``_precompute_ref_logps`` runs
                  on text data) on batches of B pairs from its own ``DataCollatorForVisionPreference`` (which
                  reads the images and tokenises per batch: that is where TRL's vision path does it), the
                  LoRA policy with its adapter disabled as the reference (TRL's leanest mode), in eval mode.
                  Timed: collation + forward; the forward alone is printed beside it.
  Agreement: max |diff| of the two tools' summed completion log-probs per pair (joined by prefcache's ids).
- training, seconds per optimizer step and peak RSS (bench_train.py's workers, ``vision`` on):
  - prefcache     : ``prefcache.train`` at its defaults from the cache above (no reference model loaded);
  - trl_ref_model : DPOTrainer with a separately loaded reference model;
  - trl_peft_ref  : DPOTrainer with no ref_model: the policy with its adapter disabled (TRL's leanest mode).
  Same rows in the same order (prefcache's first-epoch order, TRL's sequential sampler), LoRA r=16, alpha=32,
  dropout 0 on every linear layer of the language model (prefcache's default on a VLM; TRL gets the same
  ``exclude_modules``, so neither trains the vision tower or the projector), sigmoid loss beta 0.1, AdamW lr
  1e-5, constant, clipping 1.0, activation checkpointing on (both tools' default). s/step: the mean over
  --steps steps after --warmup steps. Memory: the process's peak RSS, and the peak over the RSS just before
  the weights load.

Targets (issue 19): precompute >= 3x TRL's reference pass per pair at the same batch size and precision; train
s/step <= 0.5x TRL's fastest mode; peak memory <= 0.5x TRL's leanest mode. A benchmark, not a test: it prints
MET / MISS and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent), str(HERE.parent / "tests")]  # this checkout's prefcache; vlm_models

from bench_train import (  # noqa: E402
    JEMALLOC,
    LORA,
    launch,
    parse_or_work,
    step_seconds,
    step_tokens,
    table,
    worker_env,
)

TRAIN_MODES = ("prefcache", "trl_ref_model", "trl_peft_ref")
TRL_MODES = TRAIN_MODES[1:]
REF_PASSES = ("precompute", "trl_ref_pass")
# Targets: issue 19's VLM shape.
PRECOMPUTE_SPEEDUP, STEP_RATIO, MEMORY_RATIO = 3.0, 0.5, 0.5


# ---------------------------------------------------------------- worker side (one contender per process)

def run_precompute(spec: dict) -> dict:
    """prefcache's reference pass through the public API; the scoring and shard writing timed (the functions
    are patched where ``precompute`` looks them up at call time, if they are there)."""
    from bench_precompute import Phase

    import prefcache
    from prefcache.cache import store as pcache
    from prefcache.reference import shards as pre

    phase = Phase(spec["device"])
    if hasattr(pre, "score_shard"):
        pre.score_shard = phase.timed(pre.score_shard)
        pcache.CacheWriter.write = phase.timed(pcache.CacheWriter.write)
    t0 = time.perf_counter()
    summary = prefcache.precompute(data=spec["data"], out=spec["cache"], model=spec["model"], quantize="fp32",
                                   max_length=spec["max_length"], batch_size=spec["batch_size"],
                                   device=spec["device"], progress=False)
    call_s = time.perf_counter() - t0
    if summary["problems"]:
        raise RuntimeError(f"prefcache reported problems: {summary['problems']}")
    t = prefcache.read_cache(spec["cache"], ["id", "chosen_logps", "rejected_logps"]).to_pydict()
    return {"wall": phase.wall if phase.started else call_s, "phase": phase.started, "call_s": call_s,
            "summary_s": summary["seconds"], "pairs": summary["scored"], "rss_before": phase.rss_before,
            "phase_peak": phase.peak_rss,
            "values": {i: (c, r) for i, c, r in zip(t["id"], t["chosen_logps"], t["rejected_logps"], strict=True)}}


def run_trl_ref_pass(spec: dict) -> dict:
    """TRL's reference forward on its own vision batches: its collator, then ``compute_ref_log_probs`` with the
    policy's LoRA adapter disabled (TRL's leanest reference), in eval mode, no autocast."""
    import datasets
    import torch
    import transformers
    from bench_precompute import Phase, _resident
    from peft import LoraConfig
    from torch.utils.data import DataLoader
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from prefcache.model.vision import lora_exclude

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    processor = AutoProcessor.from_pretrained(spec["model"])
    model = _resident(AutoModelForImageTextToText.from_pretrained(spec["model"], dtype=torch.float32))
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    args = DPOConfig(output_dir=str(Path(spec["work"]) / "trl-ref"), report_to="none", use_cpu=True, bf16=False,
                     disable_tqdm=True, per_device_train_batch_size=spec["batch_size"], max_length=spec["max_length"],
                     truncation_mode="keep_start", dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      target_modules="all-linear", task_type="CAUSAL_LM", exclude_modules=lora_exclude(model))
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora)
    trainer.model.eval()
    loader = DataLoader(dataset, batch_size=spec["batch_size"], collate_fn=trainer.data_collator, shuffle=False)
    phase, forward_s, chosen, rejected = Phase(spec["device"]), 0.0, [], []
    with phase:  # the pass: every batch collated (images read, processed, tokenised), then the reference forward
        for batch in loader:
            t = time.perf_counter()
            c, r = trainer.compute_ref_log_probs(trainer.model, batch)
            forward_s += time.perf_counter() - t
            chosen += c.tolist()
            rejected += r.tolist()
    return {"wall": phase.wall, "forward_s": forward_s, "pairs": len(chosen), "rss_before": phase.rss_before,
            "phase_peak": phase.peak_rss, "values_by_row": list(zip(chosen, rejected, strict=True))}


def worker(mode: str, spec: dict) -> None:
    import bench_train
    import torch
    from bench_train import MARK, peak_memory_mb

    if mode not in REF_PASSES:  # training: bench_train.py's workers, which load a VLM when spec["vision"]
        return bench_train.worker(mode, spec)
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = run_precompute(spec) if mode == "precompute" else run_trl_ref_pass(spec)
    result["peak_mb"] = peak_memory_mb(spec["device"])
    print(MARK + json.dumps(result), flush=True)


# ---------------------------------------------------------------- parent side

def make_model_and_data(a, work: Path) -> tuple[str, Path, list]:
    """The VLM folder, the rows (JSONL, image paths) and prefcache's tokenised pairs of them, in row order."""
    from data import write_jsonl
    from transformers import AutoProcessor
    from vlm_models import make_tiny_vlm, vision_rows

    from prefcache.data.vision_pairs import iter_vision_pair_blocks
    from prefcache.model.load import default_model, load_tokenizer

    heads = max(1, a.hidden // 64)
    text = {"hidden_size": a.hidden, "intermediate_size": a.hidden * 8 // 3 // 64 * 64, "num_hidden_layers": a.layers,
            "num_attention_heads": heads, "num_key_value_heads": 2 if heads % 2 == 0 else 1}
    tower = {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}
    folder = make_tiny_vlm(work / "vlm", load_tokenizer(default_model()), "llava", image_size=a.image_size,
                           patch_size=a.patch_size, seed=a.seed, text=text, vision=tower)
    rows = vision_rows(a.pairs, work / "images", seed=a.seed, answer_words=(a.answer_words, a.answer_words + 2))
    data = write_jsonl(work / "vision-prefs.jsonl", rows)
    processor = AutoProcessor.from_pretrained(folder)
    pairs = [p for block, _ in iter_vision_pair_blocks(data, processor, a.max_length) for p in block]
    return str(folder), data, pairs


def agreement(pre: dict, trl: dict, pairs) -> str:
    """Max |diff| of the summed completion log-probs, prefcache's cache vs TRL's pass (rows joined by id)."""
    diffs = [abs(pre["values"][p.id][k] - trl["values_by_row"][i][k])
             for i, p in enumerate(pairs) if p.id in pre["values"] for k in (0, 1)]
    if not diffs:
        return "agreement: no pair in both (the cache's ids are not the data's)"
    return (f"agreement: {len(diffs) // 2}/{len(pairs)} pairs, max |diff| of summed completion log-probs "
            f"{max(diffs):.2e} nats, mean {sum(diffs) / len(diffs):.2e}")


def present(results: dict, names) -> list[tuple[str, dict]]:
    """(name, result) of the contenders in ``names`` that ran, in that order (a failed one has no result)."""
    return [(n, results[n]) for n in names if n in results]


def report_ref(res: dict, pairs) -> list[str]:
    head = ["reference pass", "s/pair", "pairs/s", "timed s", "of which forward s", "whole call s", "peak RSS MB",
            "+RSS MB", "TRL / x"]
    trl = res.get("trl_ref_pass")
    rows = []
    for name, r in present(res, REF_PASSES):
        per = r["wall"] / r["pairs"]
        rows.append(["prefcache precompute" if name == "precompute" else "TRL collate + compute_ref_log_probs",
                     f"{per:.3f}", f"{1 / per:.2f}", f"{r['wall']:.1f}",
                     f"{r['forward_s']:.1f}" if "forward_s" in r else "-",
                     f"{r['summary_s']:.1f}" if "summary_s" in r else "-", f"{r['peak_mb']:.0f}",
                     f"{r['phase_peak'] - r['rss_before']:.0f}",
                     f"{trl['wall'] / trl['pairs'] / per:.2f}" if trl else "-"])
    lines = table(head, rows)
    lines.append("  timed: prefcache its scoring + shard writing; TRL its collation + forward. whole call: "
                 "prefcache.precompute() from start to end (model load, images, tokenising, verification).")
    if "precompute" in res and trl:
        p = res["precompute"]
        if not p["phase"]:
            lines.append("  (prefcache's scoring could not be timed on its own: its whole call counts)")
        speedup = (trl["wall"] / trl["pairs"]) / (p["wall"] / p["pairs"])
        whole = (trl["wall"] / trl["pairs"]) / (p["summary_s"] / p["pairs"])
        forward = (trl["forward_s"] / trl["pairs"]) / (p["wall"] / p["pairs"])
        lines.append(f"  {'MET ' if speedup >= PRECOMPUTE_SPEEDUP else 'MISS'} precompute >= {PRECOMPUTE_SPEEDUP:.0f}x "
                     f"TRL's reference pass per pair, same batch and precision ({speedup:.2f}x)")
        lines.append(f"  (prefcache's whole call vs TRL's pass: {whole:.2f}x; prefcache's timed phase vs TRL's "
                     f"forwards alone, no collation: {forward:.2f}x)")
        lines.append("  " + agreement(p, trl, pairs))
    return lines


def report_train(res: dict, tokens: dict, warmup: int, total: int) -> list[str]:
    timed = slice(warmup, total)
    head = ["training mode", "peak RSS MB", "over pre-load MB", "s/step", "padding", "mem prefcache/x",
            "time prefcache/x"]
    p = res.get("prefcache")
    rows = []
    for mode, r in present(res, TRAIN_MODES):
        steps = tokens[mode][timed]
        pad = (sum(r["padding"][timed]) / len(r["padding"][timed]) if "padding" in r
               else 1 - sum(t for t, _ in steps) / sum(n for _, n in steps))
        rows.append([mode, f"{r['peak_mb']:.0f}", f"{r['peak_mb'] - r['base_mb']:.0f}", f"{r['s_per_step']:.3f}",
                     f"{pad:.1%}", f"{p['peak_mb'] / r['peak_mb']:.2f}" if p else "-",
                     f"{p['s_per_step'] / r['s_per_step']:.2f}" if p else "-"])
    lines = table(head, rows)
    if p and all(m in res for m in TRL_MODES):
        fastest = min(TRL_MODES, key=lambda m: res[m]["s_per_step"])
        leanest = min(TRL_MODES, key=lambda m: res[m]["peak_mb"])
        f, m = p["s_per_step"] / res[fastest]["s_per_step"], p["peak_mb"] / res[leanest]["peak_mb"]
        lines.append(f"  {'MET ' if f <= STEP_RATIO else 'MISS'} s/step <= {STEP_RATIO}x TRL's fastest mode "
                     f"({fastest}) ({f:.2f}x)")
        lines.append(f"  {'MET ' if m <= MEMORY_RATIO else 'MISS'} peak memory <= {MEMORY_RATIO}x TRL's leanest mode "
                     f"({leanest}) ({m:.2f}x)")
        over = (p["peak_mb"] - p["base_mb"]) / (res[leanest]["peak_mb"] - res[leanest]["base_mb"])
        lines.append(f"  (peak over the pre-load RSS vs {leanest}: {over:.2f}x)")
    return lines


def contest(names, spec: dict, env: dict, rounds: int, warmup: int | None = None) -> dict:
    """Each named contender ``rounds`` times, round-robin; the fastest run of each is kept. A failed contender is
    reported and left out (prefcache's VLM path may not be there yet)."""
    best: dict[str, dict] = {}
    for rnd in range(rounds):
        for name in names:
            t = time.perf_counter()
            try:
                r = launch(name, {**spec, "work": str(Path(spec["work"]) / f"round-{rnd}"),
                                  "cache": spec["cache"] if warmup is not None else f"{spec['cache']}-{rnd}"},
                           env, __file__)
            except RuntimeError as e:
                print(f"  round {rnd + 1}: {name:<14} FAILED: {str(e)[-1500:]}", flush=True)
                continue
            if warmup is not None:
                r["s_per_step"] = step_seconds(r["step_ends"], warmup)
            key = "s_per_step" if warmup is not None else "wall"
            if name not in best or r[key] < best[name][key]:
                best[name] = r
            shown = f"{r['s_per_step']:7.3f} s/step" if warmup is not None else f"{r['wall'] / r['pairs']:7.3f} s/pair"
            print(f"  round {rnd + 1}: {name:<14} peak {r['peak_mb']:7.0f} MB  {shown}  (process "
                  f"{time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 pairs, batch 2, 1 warm-up + 1 timed step (< 3 min)")
    ap.add_argument("--pairs", type=int, default=None,
                    help="pairs precomputed [default: enough for the training steps, at least 32 (quick: 4)]")
    ap.add_argument("--batch-size", type=int, default=None, help="pairs per forward and per step [4; quick: 2]")
    ap.add_argument("--warmup", type=int, default=None, help="steps before the timed ones [2; quick: 1]")
    ap.add_argument("--steps", type=int, default=None, help="timed steps [5; quick: 1]")
    ap.add_argument("--image-size", type=int, default=128, help="pixels a side; (size / patch)^2 image tokens")
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=384, help="the language model's width")
    ap.add_argument("--layers", type=int, default=6, help="the language model's layers")
    ap.add_argument("--answer-words", type=int, default=26, help="words of the chosen answers (rejected: 2 more)")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--trl-only", action="store_true", help="TRL's side alone")
    a = parse_or_work(ap, worker)
    if a is None:
        return
    quick = a.quick
    a.batch_size = a.batch_size or (2 if quick else 4)
    a.warmup = a.warmup if a.warmup is not None else (1 if quick else 2)
    a.steps = a.steps or (1 if quick else 5)
    total = a.warmup + a.steps
    a.pairs = a.pairs or max(total * a.batch_size, 4 if quick else 32)
    if a.allocator == "jemalloc" and not Path(JEMALLOC).exists():
        print(f"{JEMALLOC} not found (apt-get install libjemalloc2): using glibc malloc")
        a.allocator = "glibc"
    from data import warn_if_busy, write_jsonl

    from prefcache.training.loop import epoch_order

    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    model, data, pairs = make_model_and_data(a, work)
    if len(pairs) < total * a.batch_size:
        ap.error(f"{len(pairs)} pairs: fewer than {total} steps of {a.batch_size}")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    train_pairs = pairs[: total * a.batch_size]  # one epoch of the first rows: every pair once
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in train_pairs]
    order = epoch_order(len(train_pairs), a.seed, 0, 0, 1, lengths, a.batch_size)  # prefcache's first epoch
    train_data = write_jsonl(work / "train.jsonl", rows[: len(train_pairs)])
    trl_data = write_jsonl(work / "train-trl-order.jsonl", [rows[i] for i in order])
    tokens = {m: step_tokens(train_pairs, order, a.batch_size, m == "prefcache") for m in TRAIN_MODES}
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    image_tokens = (a.image_size // a.patch_size) ** 2
    print(f"model {model}: LLaVA, CLIP {a.image_size}px / patch {a.patch_size} = {image_tokens} image tokens, "
          f"Llama hidden {a.hidden} x {a.layers} layers; {len(pairs)} pairs, median prompt "
          f"{med([len(p.prompt_ids) for p in pairs])} tokens, median answers {med([len(p.chosen_ids) for p in pairs])}"
          f" / {med([len(p.rejected_ids) for p in pairs])}\nbatch {a.batch_size} pairs, fp32, max_length "
          f"{a.max_length}, {a.threads} threads, {a.warmup} warm-up + {a.steps} timed steps, allocator {a.allocator}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    warn_if_busy()
    env = worker_env(a.threads, a.allocator)
    spec = {"model": model, "data": str(data), "cache": str(work / "cache"), "work": str(work / "ref"),
            "batch_size": a.batch_size, "max_length": a.max_length, "threads": a.threads, "seed": a.seed,
            "device": "cpu"}
    print("\nreference pass:", flush=True)
    ref = contest(["trl_ref_pass"] if a.trl_only else list(REF_PASSES), spec, env, a.rounds)
    cache = ref.get("precompute") and f"{spec['cache']}-0"  # a cache of every pair (the train rows are a prefix)
    train_spec = {**spec, "data": str(train_data), "trl_data": str(trl_data), "cache": cache, "work": str(work / "train"),
                  "total_steps": total, "warmup": a.warmup, "checkpointing": True, "vision": True}
    modes = [m for m in TRAIN_MODES if m in TRL_MODES or (cache and not a.trl_only)]
    print("\ntraining:", flush=True)
    res = contest(modes, train_spec, env, a.rounds, a.warmup)
    print("\n[vision pairs: reference pass]\n" + "\n".join(report_ref(ref, pairs)))
    print("\n[vision pairs: training]\n" + "\n".join(report_train(res, tokens, a.warmup, total)))
    print(f"\nwork dir {work}; total {time.perf_counter() - t0:.0f} s, load average now {os.getloadavg()[0]:.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"reference": ref, "train": res}, indent=2, default=str))


if __name__ == "__main__":
    main()
