"""The training loop: preference optimisation against a precomputed reference cache.

Only the policy is loaded. The reference model's summed log-probs come from the cache, joined to each
batch by example id (never by row order), after checking that the cache was made with the tokenisation
training is about to use. Policy log-probs come from the kernel that made the cache
(``prefcache.logprobs`` through ``scoring.pair_logps``), so a fresh LoRA policy on the reference model
starts with rewards of 0 and a sigmoid loss of ln 2 (to 1e-5, at the precision the cache was made in;
QLoRA on a 4-bit cache included).

The loop reads top to bottom: seeded epoch-wise data order -> micro-batches with gradient accumulation
-> loss -> clip -> optimizer and LR schedule -> log / eval / checkpoint. Under ``torchrun`` each rank
takes every world_size-th pair of the epoch's permutation (DistributedSampler's split) and DDP averages
the gradients; rank 0 writes the logs with metrics gathered from all ranks.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist

from . import __version__
from .checkpoint import (
    checkpoint_dir,
    clean_temporaries,
    latest_checkpoint,
    load_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .columns import RowMapping, check_cache_mapping
from .config import UNPAIRED_LOSSES, TrainConfig
from .guards import STEP0_MARGIN_TOLERANCE, check_reference_values, check_step, resolve_finetune
from .locking import directory_lock
from .losses import LossInputs, combined_loss, ld_logps
from .runconfig import write_config
from .rundir import check_run_dir
from .schedule import make_scheduler
from .scoring import (
    PairLogps,
    ReferenceTable,
    aggregate,
    check_cache_matches,
    check_joined,
    pair_logps,
    score_pairs,
)
from .trackers import Trackers
from .trainlog import EXAMPLE_SCHEMA, RunLog, peak_mem_mb, write_json_atomic, write_pairs

STATE_VERSION = 1


def train(config: TrainConfig | None = None, **options) -> dict:
    """Train a policy on ``config.data`` against the reference cache ``config.cache``.

    ``train(data="prefs.jsonl", cache="ref-cache", out="run1", max_steps=100)`` is the same as the CLI.
    Returns a summary: run dir, steps, final checkpoint path, the last logged train and eval metrics,
    seconds, and the checkpoint it resumed from (or None).
    """
    cfg = config or TrainConfig(**options)
    check_run_dir(cfg.out, cfg.resume)  # before the lock, so a refusal leaves nothing behind
    # One writer per run directory; ranks > 0 write nothing there.
    with directory_lock(cfg.out, "prefcache train", enabled=int(os.environ.get("RANK", 0)) == 0):
        if cfg.loss[0] in UNPAIRED_LOSSES:  # KTO-style losses on unpaired data: their own loop
            from .kto import train_unpaired

            return train_unpaired(cfg)
        return _train(cfg)


def _train(cfg: TrainConfig) -> dict:
    from tqdm.auto import tqdm

    from .data import load_dataset_pairs, write_bad_rows
    from .models import load_tokenizer, resolve_device, resolve_model
    from .policy import load_policy
    from .reference import dist_info, init_distributed

    rank, world = dist_info()
    device = resolve_device(cfg.device)
    if world > 1:
        init_distributed(device)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
    main = rank == 0
    out = Path(cfg.out)

    # 1. Tokenizer, reference cache and data: everything is checked before a model is loaded.
    source = resolve_model(cfg.model, cfg.revision)
    mapping = RowMapping.of(cfg)
    tokenizer = load_tokenizer(source)
    reference = ReferenceTable.from_cache(cfg.cache) if cfg.cache else None
    max_length = cfg.max_length or (reference.metadata["max_length"] if reference else 1024)
    truncation = cfg.truncation or (reference.metadata["truncation"] if reference else "keep_start")
    if reference:
        check_cache_matches(reference.metadata, tokenizer, max_length, truncation)
        check_cache_mapping(reference.metadata, mapping, cfg.cache)
    finetune, mismatch = resolve_finetune(cfg.finetune, reference.metadata if reference else None, device)
    if finetune != cfg.finetune:  # run.json and checkpoints record the policy actually trained
        cfg = replace(cfg, finetune=finetune)
    if mismatch and main:
        print(f"prefcache train: warning: {mismatch}", file=sys.stderr)
    data_options = {"data_config": cfg.data_config, "mapping": mapping}
    pairs, bad_rows, examples = load_dataset_pairs(cfg.data, tokenizer, max_length, truncation, cfg.on_bad_row,
                                                   split=cfg.split, **data_options)
    eval_pairs, eval_reference, eval_examples = [], reference, []
    if cfg.eval_data:
        eval_reference = ReferenceTable.from_cache(cfg.eval_cache) if cfg.eval_cache else reference
        if eval_reference is not reference:
            check_cache_matches(eval_reference.metadata, tokenizer, max_length, truncation)
            check_cache_mapping(eval_reference.metadata, mapping, cfg.eval_cache)
        eval_pairs, _, eval_examples = load_dataset_pairs(cfg.eval_data, tokenizer, max_length, truncation,
                                                          cfg.on_bad_row, split=cfg.eval_split, **data_options)
    elif cfg.eval_fraction:
        held = held_out_ids([p.id for p in pairs], cfg.eval_fraction)
        eval_pairs = [p for p in pairs if p.id in held]
        pairs = [p for p in pairs if p.id not in held]
    if reference:
        check_joined(reference, pairs, "training")
        check_reference_values(reference, pairs, "training")
    if eval_reference and eval_pairs:
        check_joined(eval_reference, eval_pairs, "eval")
        check_reference_values(eval_reference, eval_pairs, "eval")
    if not pairs:
        raise ValueError(f"no training pairs in {cfg.data}")

    steps_per_epoch = math.ceil(math.ceil(len(pairs) / world) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch

    # 2. The run directory: a fresh one, or a resume from its latest checkpoint.
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if (notice := check_run_dir(out, cfg.resume)) and main:
        print(f"prefcache train: {notice}", file=sys.stderr)
    state = load_trainer_state(ckpt) if ckpt else None
    if state:
        check_resumable(state, world=world, n_train=len(pairs), cfg=cfg)
    if world > 1:  # every rank has looked at the run dir before rank 0 starts writing to it
        dist.barrier()
    log = RunLog(out, enabled=main)
    if main:
        clean_temporaries(out)
        log.truncate(state["step"] if state else -1)  # rows after the checkpoint are logged again below
        write_pairs(out / "pairs.parquet", examples + eval_examples)
        if bad_rows:
            write_bad_rows(out / "bad_rows.jsonl", bad_rows)

    # 3. The policy (only it), its optimizer and schedule; DDP wraps the module whose forward runs.
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random
    full_ckpt = ckpt and cfg.finetune == "full"
    policy, policy_info = load_policy(
        resolve_model(str(ckpt)) if full_ckpt else source, finetune=cfg.finetune, device=device,
        adapter=None if full_ckpt else (ckpt or cfg.adapter), lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, lora_target=cfg.lora_target, gradient_checkpointing=cfg.gradient_checkpointing)
    from .logprobs import LogProbModule, router_aux_coef
    from .packing import training_sharing

    sharing = training_sharing(cfg.prefix_sharing, reference.metadata if reference else None, policy)
    module = LogProbModule(policy, chunk_size=cfg.chunk_size, router_aux=True)
    aux_coef = router_aux_coef(policy)  # MoE: the model's own weight of its router load-balancing loss
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    schedule = cfg.scheduler
    scheduler = make_scheduler(optimizer, schedule, warmup=warmup, total=total_steps, peak_lr=cfg.lr)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, as in any data-parallel run
    step, bco_sum, bco_count, elapsed_before, last_eval_step = 0, 0.0, 0, 0.0, None
    if state:
        optimizer.load_state_dict(state["optimizer"])
        # The lr is recomputed from the step and this run's total (never the saved schedule's): extending
        # a finished run trains its new steps at a real lr.
        scheduler = make_scheduler(optimizer, schedule, warmup=warmup, total=total_steps, peak_lr=cfg.lr,
                                   done=state["step"])
        set_rng_state(state["rng"][rank])
        step, bco_sum, bco_count, elapsed_before = state["step"], *state["bco"], state["elapsed_s"]
        last_eval_step = state["last_eval_step"]

    run_info = {"config": asdict(cfg), "prefcache_version": __version__, "world_size": world,
                "max_length": max_length, "truncation": truncation, "policy": policy_info,
                "cache": reference.metadata if reference else None,
                "eval_cache": eval_reference.metadata if eval_pairs and eval_reference else None,
                "train_pairs": len(pairs), "eval_pairs": len(eval_pairs), "bad_rows": len(bad_rows),
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
                "pairs_per_step": cfg.batch_size * cfg.grad_accum * world, "prefix_sharing": sharing,
                "resumed_from": str(ckpt) if ckpt else None,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if main:
        write_json_atomic(run_info, out / "run.json")
        write_config(cfg, out / "config.yaml")  # `prefcache train --config RUN/config.yaml` runs it again
    trackers = Trackers(cfg.report_to if main else (), out, run_info, state["step"] if state else None)

    loss_options = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "simpo_gamma": cfg.simpo_gamma,
                    "discopop_tau": cfg.discopop_tau, "ld_alpha": cfg.ld_alpha, "f_divergence": cfg.f_divergence,
                    "f_alpha": cfg.f_alpha, "use_weighting": cfg.use_weighting}
    uses_bco = "bco_pair" in cfg.loss
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.startswith("cuda")
                else nullcontext())
    pad_id = tokenizer.pad_token_id
    t_start = time.perf_counter() - elapsed_before
    last_train, last_eval, last_saved = {}, {}, (step if state else None)
    step0_margin = None

    def run_eval(at_step: int) -> None:
        nonlocal last_eval, last_eval_step
        bco = {"bco_delta": bco_sum / bco_count if bco_count else 0.0} if uses_bco else {}
        cols, losses = evaluate_split(policy, eval_pairs[rank::world], eval_reference, cfg, pad_id=pad_id,
                                      device=device, loss_options={**loss_options, **bco}, prefix_sharing=sharing)
        parts = gather((cols, losses), world)
        if main:
            cols = {k: [v for c, _ in parts for v in c[k]] for k in cols}
            last_eval = aggregate(cols) | {"loss": sum(s for _, s in parts) / len(cols["id"])}
            log.add_examples(cols, step=at_step, split="eval")
            log.add_step(row := {**last_eval, "step": at_step, "epoch": at_step / steps_per_epoch, "split": "eval",
                          "time_s": time.perf_counter() - t_start, "peak_mem_mb": peak_mem_mb(device)})
            trackers.log(row, step=at_step, split="eval")
        last_eval_step = at_step

    def save(at_step: int) -> None:
        rngs = gather(rng_state(), world)
        if main:
            log.flush()  # the logs up to this step are on disk before the checkpoint that vouches for them
            trainer_state = {"version": STATE_VERSION, "step": at_step, "epoch": at_step / steps_per_epoch,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
                             "bco": (bco_sum, bco_count), "elapsed_s": time.perf_counter() - t_start,
                             "world_size": world, "n_train": len(pairs), "batch_size": cfg.batch_size,
                             "grad_accum": cfg.grad_accum, "seed": cfg.seed, "last_eval_step": last_eval_step,
                             "group_by_length": cfg.group_by_length}
            info = {"step": at_step, "epoch": at_step / steps_per_epoch, "base_model": policy_info["model_name"],
                    "model": cfg.model, "finetune": cfg.finetune, "max_length": max_length, "truncation": truncation,
                    "loss": list(cfg.loss), "beta": cfg.beta, "cache": cfg.cache, "prefcache_version": __version__}
            save_checkpoint(out, at_step, policy, tokenizer, trainer_state, info)
        if world > 1:
            dist.barrier()

    if eval_pairs and step == 0:
        run_eval(0)  # the baseline: at step 0 a fresh LoRA policy is the reference
    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    order, order_epoch = None, None
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if order_epoch != epoch:  # a fresh seeded permutation each epoch, resumable from the step alone
            lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs] \
                if cfg.group_by_length else None
            order = epoch_order(len(pairs), cfg.seed, epoch, rank, world, lengths, cfg.batch_size * cfg.grad_accum)
            order_epoch = epoch
        span = cfg.batch_size * cfg.grad_accum
        step_idx = order[position * span : (position + 1) * span]
        micro = [step_idx[i : i + cfg.batch_size] for i in range(0, len(step_idx), cfg.batch_size)]
        t0 = time.perf_counter()
        loss_sum, tokens, positions, cols, aux_sum = 0.0, 0, 0, [], None
        for k, idx in enumerate(micro):
            batch = [pairs[i] for i in idx]
            ids = [p.id for p in batch]
            # DDP all-reduces gradients on the last micro-batch of the step only.
            sync = module.no_sync() if world > 1 and k < len(micro) - 1 else nullcontext()
            with sync:
                with autocast:
                    pol = pair_logps(module, batch, pad_id=pad_id, device=device, chunk_size=cfg.chunk_size,
                                     prefix_sharing=sharing, wpo=cfg.use_weighting)
                ref = {c: v.to(device) for c, v in reference.lookup(ids).items()} if reference else None
                inputs = loss_inputs(pol, ref)
                bco = {}
                if uses_bco:  # bco_pair's reward shift: the running mean of all rewards seen so far
                    rewards = cfg.beta * torch.cat([inputs.policy_chosen_logps - inputs.ref_chosen_logps,
                                                    inputs.policy_rejected_logps - inputs.ref_rejected_logps])
                    seen = torch.tensor([rewards.detach().sum().item(), rewards.numel()], dtype=torch.float64)
                    if world > 1:
                        seen = seen.to(device)
                        dist.all_reduce(seen)
                    bco_sum, bco_count = bco_sum + seen[0].item(), bco_count + int(seen[1].item())
                    bco = {"bco_delta": bco_sum / bco_count}
                result = combined_loss(cfg.loss, cfg.loss_weights, inputs, **loss_options, **bco)
                check_step(step + 1, ids, result.losses)  # before backward: NaN never reaches the weights
                # Each micro-batch's mean, weighted by its share of the step: the step's gradient is
                # that of the mean over all its pairs, whatever the split into micro-batches.
                loss = result.loss
                if (aux := getattr(module, "module", module).aux_loss) is not None:
                    # A mixture of experts also learns to balance its router, as its own forward would have it.
                    loss = loss + aux_coef * aux
                    aux_sum = (aux_sum or 0.0) + aux.item() * len(batch)
                (loss * (len(batch) / len(step_idx))).backward()
            loss_sum += result.loss.item() * len(batch)
            tokens += pol.n_tokens
            positions += pol.n_positions
            cols.append(example_cols(batch, inputs, result, cfg.beta, cfg.ld_alpha))

        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf).item()
        check_step(step + 1, [pairs[i].id for i in step_idx], torch.zeros(0), grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_time = time.perf_counter() - t0

        cols = {k: [v for c in cols for v in c[k]] for k in cols[0]}
        local = aggregate(cols)
        if step == 1 and reference is not None and main:  # step 1's numbers are the step-0 policy's
            step0_margin = local["rewards_margins"]
            print(f"prefcache train: step 0 margin {step0_margin:.4g}, loss {loss_sum / len(step_idx):.4f} "
                  f"(0 and ln 2 = 0.6931 when the policy starts as the cache's reference)"
                  + ("; the policy is NOT the cache's reference" if abs(step0_margin) > STEP0_MARGIN_TOLERANCE
                     else ""), file=sys.stderr)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / len(step_idx):.4f}", acc=f"{local['rewards_accuracies']:.2f}",
                        margin=f"{local['rewards_margins']:.3f}", refresh=False)
        if step % cfg.log_every == 0 or step == total_steps:
            parts = gather((cols, loss_sum, tokens, peak_mem_mb(device), positions, aux_sum), world)
            if main:
                cols = {k: [v for c, *_ in parts for v in c[k]] for k in cols}
                last_train = aggregate(cols) | {"loss": sum(p[1] for p in parts) / len(cols["id"])}
                log.add_examples(cols, step=step, split="train")
                log.add_step(row := {**last_train, "step": step, "epoch": step / steps_per_epoch, "split": "train",
                              "lr": lr, "grad_norm": grad_norm, "tokens_per_s": sum(p[2] for p in parts) / step_time,
                              "peak_mem_mb": max(p[3] for p in parts), "time_s": time.perf_counter() - t_start,
                              # the share of the computed token positions that were padding
                              "padding_share": 1 - sum(p[2] for p in parts) / max(sum(p[4] for p in parts), 1),
                              "aux_loss": None if aux_sum is None else sum(p[5] for p in parts) / len(cols["id"])})
                trackers.log(row, step=step, split="train")
        if eval_pairs and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            run_eval(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
            save(step)
            last_saved = step
        if log.pending >= cfg.flush_every:
            log.flush()
    bar.close()
    if eval_pairs and last_eval_step != step:
        run_eval(step)
    if last_saved != step:  # a resume of a finished run: make sure the final checkpoint exists
        save(step)
    log.flush()
    trackers.close()

    summary = {"run": str(out), "steps": step, "final_checkpoint": str(checkpoint_dir(out, step)),
               "train": {k: v for k, v in last_train.items() if k != "n"}, "eval": last_eval,
               "seconds": time.perf_counter() - t_start, "resumed_from": str(ckpt) if ckpt else None,
               "step0_margin": step0_margin}
    if main:
        write_json_atomic(run_info | {"result": summary}, out / "run.json")
    if world > 1:
        dist.barrier()
    return summary


def held_out_ids(ids: list[str], fraction: float) -> set[str]:
    """The eval share of the training ids, picked by a hash of the id: the same ids whatever the row order."""
    k = max(1, round(fraction * len(ids)))
    return set(sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:k])



def check_resumable(state: dict, *, world: int, n_train: int, cfg: TrainConfig) -> None:
    """The data order is a function of these: resuming with others would not continue the same run."""
    now = {"world_size": world, "n_train": n_train, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
           "seed": cfg.seed, "group_by_length": cfg.group_by_length}
    had = {"group_by_length": False}  # checkpoints from before length grouping: random batches
    if diff := [f"{k}: checkpoint has {state.get(k, had.get(k))!r}, now {v!r}" for k, v in now.items()
                if state.get(k, had.get(k)) != v]:
        raise ValueError("cannot resume with other settings:\n  " + "\n  ".join(diff))


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, lengths: list[int] | None = None,
                span: int = 1) -> list[int]:
    """This rank's pair indices for an epoch: a permutation seeded by (seed + epoch), padded to a multiple
    of world_size by wrapping around, then every world_size-th index (as torch's DistributedSampler).

    With ``lengths`` (tokens per pair), length-grouped as transformers' ``group_by_length``: the permutation
    is cut into mega-batches of up to 50 steps' pairs (``span`` pairs per step per rank, times world_size;
    fewer on small data), each sorted longest first, so a micro-batch holds pairs of similar length. Still
    a function of (seed, epoch, rank, world, lengths, span) only: resume and data parallelism are unchanged,
    and a step sees the same pairs whatever its split into micro-batches or ranks.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if lengths is not None:
        step = span * world
        mega = step * max(1, min(n // (4 * step), 50))
        perm = [i for s in range(0, n, mega) for i in sorted(perm[s : s + mega], key=lambda i: -lengths[i])]
    per_rank = math.ceil(n / world)
    perm += perm[: per_rank * world - n]
    return perm[rank::world]


def make_optimizer(cfg: TrainConfig, params):
    """AdamW (torch), or bitsandbytes' 8-bit / paged 8-bit AdamW. Weight decay on matrices only."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=cfg.lr)


def loss_inputs(pol: PairLogps, ref: dict | None) -> LossInputs:
    """Policy values (fp32 from the kernel) and cached ones (float64), as float64 [B] loss inputs."""
    d = lambda t: None if t is None else t.double()  # noqa: E731
    r = ref or {}
    return LossInputs(d(pol.chosen), d(pol.rejected), d(r.get("chosen_logps")), d(r.get("rejected_logps")),
                      d(pol.chosen_tokens), d(pol.rejected_tokens), d(pol.chosen_prefix), d(pol.rejected_prefix),
                      d(r.get("chosen_logps_prefix")), d(r.get("rejected_logps_prefix")), d(pol.chosen_wpo),
                      d(pol.rejected_wpo))


def example_cols(batch, inputs: LossInputs, result, beta: float, ld_alpha: float | None = None) -> dict[str, list]:
    """Per-example log columns. With a reference, reward = beta * (policy - ref) on summed log-probs (as
    ``prefcache score``), on the LD-weighted log-probs under ld_alpha (what TRL logs; the logps columns
    stay the plain sums); reference-free, the loss's own rewards (e.g. simpo: beta * mean log-prob)."""
    pc, pr = inputs.policy_chosen_logps.detach().cpu(), inputs.policy_rejected_logps.detach().cpu()
    if inputs.ref_chosen_logps is not None:
        rc, rr = inputs.ref_chosen_logps.cpu(), inputs.ref_rejected_logps.cpu()
        wc, wr = beta * (pc - rc), beta * (pr - rr)
        if ld_alpha is not None:
            ld = lambda f: ld_logps(getattr(inputs, f), getattr(inputs, f + "_prefix"), ld_alpha).detach().cpu()  # noqa: E731
            wc = beta * (ld("policy_chosen_logps") - ld("ref_chosen_logps"))
            wr = beta * (ld("policy_rejected_logps") - ld("ref_rejected_logps"))
        rc, rr = rc.tolist(), rr.tolist()
    else:
        rc = rr = [None] * len(batch)
        wc, wr = result.chosen_rewards.detach().cpu().double(), result.rejected_rewards.detach().cpu().double()
    return {"id": [p.id for p in batch], "policy_chosen_logps": pc.tolist(), "policy_rejected_logps": pr.tolist(),
            "ref_chosen_logps": rc, "ref_rejected_logps": rr, "reward_chosen": wc.tolist(),
            "reward_rejected": wr.tolist(), "margin": (wc - wr).tolist(),
            "prompt_tokens": [len(p.prompt_ids) for p in batch], "chosen_tokens": [len(p.chosen_ids) for p in batch],
            "rejected_tokens": [len(p.rejected_ids) for p in batch]}


def evaluate_split(policy, pairs, reference, cfg: TrainConfig, *, pad_id, device, loss_options,
                   prefix_sharing: bool = False) -> tuple[dict, float]:
    """Per-example columns and the summed loss of held-out pairs, no gradients.

    With a reference the columns come from ``scoring.score_pairs``, the code path of ``prefcache score``,
    so its numbers for a checkpoint are the run's eval numbers. The loss needs a policy pass of its own
    only when score's columns cannot give it (reference-free, or ld_alpha's prefix sums).
    """
    if not pairs:  # a rank whose share of a tiny eval set is empty
        return {c: [] for c in EXAMPLE_SCHEMA.names if c not in ("step", "split", "checkpoint")}, 0.0
    batch_size = cfg.eval_batch_size or cfg.batch_size
    cols = None
    if reference is not None:
        cols, _ = score_pairs(policy, pairs, reference, beta=cfg.beta, batch_size=batch_size, pad_id=pad_id,
                              device=device, chunk_size=cfg.chunk_size, prefix_sharing=prefix_sharing)
    if cols is not None and cfg.ld_alpha is None and not cfg.use_weighting:
        t = {k: torch.tensor(cols[k], dtype=torch.float64) for k in cols if k != "id"}
        inputs = LossInputs(t["policy_chosen_logps"], t["policy_rejected_logps"], t["ref_chosen_logps"],
                            t["ref_rejected_logps"], t["chosen_tokens"], t["rejected_tokens"])
    else:
        was_training = policy.training
        policy.eval()
        with torch.no_grad():
            parts = [pair_logps(policy, pairs[s : s + batch_size], pad_id=pad_id, device=device,
                                chunk_size=cfg.chunk_size, prefix_sharing=prefix_sharing, wpo=cfg.use_weighting)
                     for s in range(0, len(pairs), batch_size)]
        policy.train(was_training)
        pol = PairLogps(*(torch.cat([getattr(p, f) for p in parts]).cpu() for f in
                          ("chosen", "rejected", "chosen_prefix", "rejected_prefix", "chosen_tokens",
                           "rejected_tokens")), sum(p.n_tokens for p in parts),
                        **({f: torch.cat([getattr(p, f) for p in parts]).cpu() for f in ("chosen_wpo", "rejected_wpo")}
                           if cfg.use_weighting else {}))
        inputs = loss_inputs(pol, reference.lookup([p.id for p in pairs]) if reference else None)
    result = combined_loss(cfg.loss, cfg.loss_weights, inputs, **loss_options)
    if cols is None:
        cols = example_cols(pairs, inputs, result, cfg.beta, cfg.ld_alpha)
    return cols, float(result.losses.sum())


def gather(obj, world: int) -> list:
    """Every rank's ``obj`` (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts
