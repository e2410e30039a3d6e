"""KTO and unpaired APO-zero: their losses, and the training loop over unpaired data.

The losses follow TRL 1.16's ``KTOTrainer._compute_loss``. Δ = log π(y|x) - log π_ref(y|x) (summed
completion log-probs, nats), z = the batch KL estimate, w_d / w_u = desirable / undesirable weights:
- ``kto`` (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 7): desirable w_d (1 - σ(β(Δ - z))),
  undesirable w_u (1 - σ(β(z - Δ))).
- ``apo_zero_unpaired`` (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7 unpaired): desirable
  w_d (1 - σ(βΔ)), undesirable w_u σ(βΔ); no KL term.
z = max(0, mean_batch(log π(y'|x) - log π_ref(y'|x))) over the KL completions y' (mismatched completions,
see :mod:`prefcache.unpaired`), without gradient. At step 0 (policy = reference) Δ = 0 and z = 0, so every
example's kto loss is 0.5 at unit weights.

The training loop is the pair trainer's (:mod:`prefcache.trainer`) in miniature, kept apart so that the
pair path stays as it is: torchrun (each rank every world_size-th example; the KL means averaged over
ranks before the clamp, as TRL gathers them), LoRA / QLoRA / full, gradient accumulation, schedules, eval
(on rank 0), checkpoints and ``--resume`` (the same weights as a run never stopped), Parquet logs and
trackers as for pairs; batches are random (no length grouping). Logged:
rewards_chosen = mean β Δ over desirable examples, rewards_rejected = over undesirable ones, their
difference as rewards_margins (TRL's rewards/margins), logps likewise, and kl (z); no accuracies.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .config import UNPAIRED_LOSSES


class UnpairedOutput(NamedTuple):
    losses: Tensor  # [B], unreduced, weights applied
    rewards: Tensor  # [B], β Δ, detached


def kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor, reduce=None) -> Tensor:
    """TRL's KTO reference point: max(0, mean(π(y'|x) - π_ref(y'|x))) over the batch, detached (scalar).
    ``reduce``: averages the per-process means before the clamp (TRL's gather, under torchrun)."""
    mean = (policy_kl_logps - ref_kl_logps).mean().detach()
    return (reduce(mean) if reduce else mean).clamp(min=0)


def kto(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor | float, *, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> UnpairedOutput:
    """KTO per example [B]; ``labels`` [B] bool (True = desirable); ``kl`` the batch estimate z."""
    delta = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (delta - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - delta)))
    return UnpairedOutput(torch.where(labels, desirable, undesirable), (beta * delta).detach())


def apo_zero_unpaired(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl=None, *, beta: float = 0.1,
                      desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> UnpairedOutput:
    """Unpaired APO-zero per example [B]: raise desirable likelihoods, lower undesirable ones; ``kl`` unused."""
    delta = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * delta))
    undesirable = undesirable_weight * torch.sigmoid(beta * delta)
    return UnpairedOutput(torch.where(labels, desirable, undesirable), (beta * delta).detach())


UNPAIRED = {"kto": (kto, True), "apo_zero_unpaired": (apo_zero_unpaired, False)}  # name -> (fn, needs KL)
assert set(UNPAIRED) == set(UNPAIRED_LOSSES)


def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], *, pad_id: int, device, chunk_size: int):
    """Summed completion log-probs [N] (fp32) of (prompt ids, completion ids) sequences, and real tokens."""
    from .data import collate
    from .logprobs import LogProbModule, token_logprobs

    input_ids, attention, completion = (t.to(device) for t in collate([p + c for p, c in seqs],
                                                                      [len(p) for p, _ in seqs], pad_id))
    if isinstance(getattr(model, "module", model), LogProbModule):
        token = model(input_ids, attention, completion)
    else:
        token = token_logprobs(model, input_ids, attention, completion, chunk_size=chunk_size)
    return token.sum(-1), int(attention.sum())


def batch_loss(model, items, reference, by_id, cfg, *, pad_id, device, max_length, truncation, kl_model=None,
               reduce=None):
    """Loss, per-example columns and KL estimate of a batch of TokenizedCompletion. ``kl_model``: the model
    for the no-gradient KL pass (the unwrapped one under DDP); ``reduce``: see :func:`kl_estimate`."""
    from .unpaired import kl_sequence

    fn, needs_kl = UNPAIRED[cfg.loss[0]]
    ids = [i.id for i in items]
    ref = reference.lookup(ids)
    policy, n_tokens = sequence_logps(model, [(i.prompt_ids, i.completion_ids) for i in items], pad_id=pad_id,
                                      device=device, chunk_size=cfg.chunk_size)
    kl = torch.zeros((), dtype=torch.float64)
    if needs_kl:
        kl_seqs = [kl_sequence(i, by_id[reference.partner(i.id)], max_length, truncation) for i in items]
        with torch.no_grad():  # TRL: the KL term carries no gradient
            policy_kl, _ = sequence_logps(kl_model or model, kl_seqs, pad_id=pad_id, device=device,
                                          chunk_size=cfg.chunk_size)
        kl = kl_estimate(policy_kl.double(), ref["kl_logps"].to(device), reduce).cpu()
    labels = torch.tensor([i.label for i in items], device=device)
    out = fn(policy.double(), ref["logps"].to(device), labels, kl.to(device), beta=cfg.beta,
             desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    pol = policy.detach().double().cpu().tolist()
    rewards = out.rewards.cpu().tolist()
    side = lambda values, want: [v if i.label == want else None for v, i in zip(values, items, strict=True)]  # noqa: E731
    ntok = [len(i.completion_ids) for i in items]
    cols = {"id": ids, "label": [i.label for i in items],
            "policy_chosen_logps": side(pol, True), "policy_rejected_logps": side(pol, False),
            "ref_chosen_logps": side(ref["logps"].tolist(), True), "ref_rejected_logps": side(ref["logps"].tolist(), False),
            "reward_chosen": side(rewards, True), "reward_rejected": side(rewards, False), "margin": [None] * len(items),
            "prompt_tokens": [len(i.prompt_ids) for i in items], "chosen_tokens": side(ntok, True),
            "rejected_tokens": side(ntok, False)}
    return out.losses.mean(), cols, float(kl), n_tokens


def aggregate_unpaired(cols: dict[str, list]) -> dict[str, float | None]:
    """Step metrics: desirable examples fill the chosen slots, undesirable ones the rejected slots."""
    def mean(name):
        values = [v for v in cols[name] if v is not None]
        return sum(values) / len(values) if values else None

    rc, rr = mean("reward_chosen"), mean("reward_rejected")
    return {"rewards_chosen": rc, "rewards_rejected": rr,
            "rewards_margins": rc - rr if rc is not None and rr is not None else None, "rewards_accuracies": None,
            "logps_chosen": mean("policy_chosen_logps"), "logps_rejected": mean("policy_rejected_logps"),
            "n": len(cols["id"])}


def train_unpaired(cfg) -> dict:
    """``prefcache train --loss kto`` (or apo_zero_unpaired): see the module docstring."""
    from dataclasses import replace

    import pyarrow as pa
    from tqdm.auto import tqdm

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
    from .guards import resolve_finetune
    from .logprobs import LogProbModule
    from .models import load_tokenizer, resolve_device, resolve_model
    from .policy import load_policy
    from .reference import dist_info, init_distributed
    from .runconfig import write_config
    from .schedule import make_scheduler
    from .scoring import check_cache_matches
    from .trackers import Trackers
    from .trainer import check_resumable, epoch_order, gather, held_out_ids, make_optimizer
    from .trainlog import (
        EXAMPLE_SCHEMA,
        PAIRS_SCHEMA,
        RunLog,
        peak_mem_mb,
        write_json_atomic,
        write_table_atomic,
    )
    from .unpaired import UnpairedReference, check_no_mapping, load_unpaired

    if cfg.cache is None:
        raise ValueError(f"--loss {cfg.loss[0]} needs an unpaired reference cache (prefcache precompute --unpaired)")
    check_no_mapping(cfg)
    if UNPAIRED[cfg.loss[0]][1] and cfg.batch_size < 2:  # TRL refuses it too: z would be the example's own reward
        raise ValueError("kto estimates its KL term over the micro-batch: --batch-size must be at least 2")
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    if world > 1:
        import torch.distributed as dist

        init_distributed(device)
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
    main = rank == 0
    out = Path(cfg.out)  # prefcache.trainer.train checked it: a new run, or a resume of one
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source)
    reference = UnpairedReference.from_cache(cfg.cache)
    max_length = cfg.max_length or reference.metadata["max_length"]
    truncation = cfg.truncation or reference.metadata["truncation"]
    check_cache_matches(reference.metadata, tokenizer, max_length, truncation)
    cfg = replace(cfg, finetune=resolve_finetune(cfg.finetune, reference.metadata, device)[0])
    items, bad_rows, examples = load_unpaired(cfg.data, tokenizer, max_length, truncation, cfg.on_bad_row, unpair=True,
                                              split=cfg.split, data_config=cfg.data_config)
    eval_items, eval_reference, eval_examples = [], reference, []
    if cfg.eval_data:
        eval_reference = UnpairedReference.from_cache(cfg.eval_cache) if cfg.eval_cache else reference
        eval_items, _, eval_examples = load_unpaired(cfg.eval_data, tokenizer, max_length, truncation, cfg.on_bad_row,
                                                     unpair=True, split=cfg.eval_split, data_config=cfg.data_config)
    elif cfg.eval_fraction:
        held = held_out_ids([i.id for i in items], cfg.eval_fraction)
        eval_items = [i for i in items if i.id in held]
        items = [i for i in items if i.id not in held]
    if not items:
        raise ValueError(f"no training examples in {cfg.data}")
    reference.require(items, "training")
    if eval_items:
        eval_reference.require(eval_items, "eval")
    by_id = {i.id: i for i in items + eval_items}  # KL partners may sit in either split
    if missing := sorted({r.partner(i.id) for r, its in ((reference, items), (eval_reference, eval_items))
                          for i in its} - by_id.keys()):
        raise ValueError(f"{len(missing)} KL completions come from examples not in the data, e.g. {missing[:3]}")

    steps_per_epoch = math.ceil(math.ceil(len(items) / world) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    ckpt = latest_checkpoint(out) if cfg.resume else None
    state = load_trainer_state(ckpt) if ckpt else None
    if state:  # the data order is random here (no length grouping), a function of (seed, epoch)
        check_resumable(state, world=world, n_train=len(items), cfg=replace(cfg, group_by_length=False))
    if world > 1:  # every rank has looked at the run dir before rank 0 starts writing to it
        dist.barrier()
    log = RunLog(out, enabled=main)
    if main:
        clean_temporaries(out)
        log.truncate(state["step"] if state else -1)  # rows after the checkpoint are logged again below
        texts = {c: [] for c in PAIRS_SCHEMA.names}
        for e in examples + eval_examples:
            for c, v in (("id", e.id), ("prompt", e.prompt), ("chosen", e.completion if e.label else None),
                         ("rejected", None if e.label else e.completion)):
                texts[c].append(v)
        write_table_atomic(pa.Table.from_pydict(texts, schema=PAIRS_SCHEMA), out / "pairs.parquet")
        if bad_rows:
            from .data import write_bad_rows

            write_bad_rows(out / "bad_rows.jsonl", bad_rows)

    torch.manual_seed(cfg.seed)
    full_ckpt = ckpt and cfg.finetune == "full"
    policy, policy_info = load_policy(resolve_model(str(ckpt)) if full_ckpt else source, finetune=cfg.finetune,
                                      device=device, adapter=None if full_ckpt else (ckpt or cfg.adapter),
                                      lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                      lora_target=cfg.lora_target, gradient_checkpointing=cfg.gradient_checkpointing)
    plain = module = LogProbModule(policy, chunk_size=cfg.chunk_size)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg, params)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = make_scheduler(optimizer, cfg.scheduler, warmup=warmup, total=total_steps, peak_lr=cfg.lr)
    step, elapsed_before, last_eval_step = 0, 0.0, None
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler = make_scheduler(optimizer, cfg.scheduler, warmup=warmup, total=total_steps, peak_lr=cfg.lr,
                                   done=state["step"])
        set_rng_state(state["rng"][rank])
        step, elapsed_before, last_eval_step = state["step"], state["elapsed_s"], state["last_eval_step"]
    run_info = {"config": asdict(cfg), "prefcache_version": __version__, "world_size": world, "max_length": max_length,
                "truncation": truncation, "policy": policy_info, "cache": reference.metadata,
                "train_pairs": len(items), "train_examples": len(items), "eval_examples": len(eval_items),
                "bad_rows": len(bad_rows), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "warmup_steps": warmup, "resumed_from": str(ckpt) if ckpt else None,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if main:
        write_json_atomic(run_info, out / "run.json")
        write_config(cfg, out / "config.yaml")
    trackers = Trackers(cfg.report_to if main else (), out, run_info, state["step"] if state else None)
    pad_id = tokenizer.pad_token_id
    common = {"pad_id": pad_id, "device": device, "max_length": max_length, "truncation": truncation}

    def mean_over_ranks(value):  # TRL gathers the per-process KL means and averages them, then clamps
        dist.all_reduce(value)
        return value / world

    train_kl = {"kl_model": plain, "reduce": mean_over_ranks if world > 1 else None}
    t_start = time.perf_counter() - elapsed_before
    last_train, last_eval, last_saved = {}, {}, (step if state else None)

    def log_step(split, at_step, cols, loss, kl, extra=None):
        row = aggregate_unpaired(cols) | {"loss": loss, "kl": kl, "step": at_step, "epoch": at_step / steps_per_epoch,
                                          "split": split, "time_s": time.perf_counter() - t_start,
                                          "peak_mem_mb": peak_mem_mb(device), **(extra or {})}
        log.add_examples({c: cols[c] for c in EXAMPLE_SCHEMA.names if c in cols}, step=at_step, split=split)
        log.add_step(row)
        trackers.log(row, step=at_step, split=split)
        return row

    def run_eval(at_step):
        # Rank 0 evaluates every held-out example with the unwrapped model (the KL batches are then those of
        # one process); the other ranks wait.
        nonlocal last_eval, last_eval_step
        last_eval_step = at_step
        if main:
            batch_size = cfg.eval_batch_size or cfg.batch_size
            policy.eval()
            parts = []
            with torch.no_grad():
                for s in range(0, len(eval_items), batch_size):
                    chunk = eval_items[s : s + batch_size]
                    parts.append((len(chunk), *batch_loss(plain, chunk, eval_reference, by_id, cfg, **common)))
            policy.train()
            cols = {k: [v for p in parts for v in p[2][k]] for k in parts[0][2]}
            n = sum(p[0] for p in parts)
            last_eval = log_step("eval", at_step, cols, sum(p[0] * float(p[1]) for p in parts) / n,
                                 sum(p[0] * p[3] for p in parts) / n)
        if world > 1:
            dist.barrier()

    def save(at_step):
        rngs = gather(rng_state(), world)
        if main:
            log.flush()  # the logs up to this step are on disk before the checkpoint that vouches for them
            trainer_state = {"version": 1, "step": at_step, "epoch": at_step / steps_per_epoch,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs,
                             "bco": (0.0, 0), "elapsed_s": time.perf_counter() - t_start, "world_size": world,
                             "n_train": len(items), "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                             "seed": cfg.seed, "group_by_length": False, "last_eval_step": last_eval_step}
            info = {"step": at_step, "epoch": at_step / steps_per_epoch, "base_model": policy_info["model_name"],
                    "model": cfg.model, "finetune": cfg.finetune, "max_length": max_length, "truncation": truncation,
                    "loss": list(cfg.loss), "beta": cfg.beta, "cache": cfg.cache, "prefcache_version": __version__}
            save_checkpoint(out, at_step, policy, tokenizer, trainer_state, info)
        if world > 1:
            dist.barrier()

    if eval_items and step == 0:
        run_eval(0)
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.loss[0]}", unit="step",
               disable=not (main and cfg.progress))
    order, order_epoch = None, None
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if order_epoch != epoch:
            order, order_epoch = epoch_order(len(items), cfg.seed, epoch, rank, world), epoch
        span = cfg.batch_size * cfg.grad_accum
        step_idx = order[position * span : (position + 1) * span]
        t0 = time.perf_counter()
        loss_sum, kl_sum, tokens, cols = 0.0, 0.0, 0, []
        for k in range(0, len(step_idx), cfg.batch_size):
            batch = [items[i] for i in step_idx[k : k + cfg.batch_size]]
            # DDP all-reduces gradients on the last micro-batch of the step only.
            last = k + cfg.batch_size >= len(step_idx)
            with module.no_sync() if world > 1 and not last else nullcontext():
                loss, part, kl, n_tokens = batch_loss(module, batch, reference, by_id, cfg, **common, **train_kl)
                (loss * (len(batch) / len(step_idx))).backward()  # the step's gradient: the mean over its examples
            loss_sum, kl_sum, tokens = loss_sum + loss.item() * len(batch), kl_sum + kl * len(batch), tokens + n_tokens
            cols.append(part)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == total_steps:
            parts = gather(({c: [v for p in cols for v in p[c]] for c in cols[0]}, loss_sum, kl_sum, tokens), world)
            if main:
                cols = {c: [v for p in parts for v in p[0][c]] for c in parts[0][0]}
                n = len(cols["id"])
                last_train = log_step("train", step, cols, sum(p[1] for p in parts) / n, sum(p[2] for p in parts) / n,
                                      {"lr": lr, "grad_norm": grad_norm,
                                       "tokens_per_s": sum(p[3] for p in parts) / (time.perf_counter() - t0)})
        if eval_items and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            run_eval(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == total_steps:
            save(step)
            last_saved = step
        if log.pending >= cfg.flush_every:
            log.flush()
    bar.close()
    if eval_items and last_eval_step != step:
        run_eval(step)
    if last_saved != step:  # a resume of a finished run: make sure the final checkpoint exists
        save(step)
    log.flush()
    trackers.close()
    strip = lambda row: {k: v for k, v in row.items() if k not in ("n", "split", "step", "epoch")}  # noqa: E731
    summary = {"run": str(out), "steps": step, "final_checkpoint": str(checkpoint_dir(out, step)),
               "train": strip(last_train), "eval": strip(last_eval) | {"n": last_eval["n"]} if last_eval else {},
               "seconds": time.perf_counter() - t_start, "resumed_from": str(ckpt) if ckpt else None}
    if main:
        write_json_atomic(run_info | {"result": summary}, out / "run.json")
    if world > 1:
        dist.barrier()
    return summary
