"""KTO and unpaired APO-zero: their losses, and the training loop over unpaired data.

The losses follow TRL 1.16's ``KTOTrainer._compute_loss``. Δ = log π(y|x) - log π_ref(y|x) (summed
completion log-probs, nats), z = the batch KL estimate, w_d / w_u = desirable / undesirable weights:
- ``kto`` (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 7): desirable w_d (1 - σ(β(Δ - z))),
  undesirable w_u (1 - σ(β(z - Δ))).
- ``apo_zero_unpaired`` (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7 unpaired): desirable
  w_d (1 - σ(βΔ)), undesirable w_u σ(βΔ); no KL term.
z = max(0, mean_batch(log π(y'|x) - log π_ref(y'|x))) over the KL completions y' (mismatched completions,
see :mod:`prefcache.data.unpaired`), without gradient. At step 0 (policy = reference) Δ = 0 and z = 0, so every
example's kto loss is 0.5 at unit weights.

The training loop is the pair trainer's (:mod:`prefcache.training.loop`) in miniature, kept apart so that the
pair path stays as it is: torchrun (each rank every world_size-th example; the KL means averaged over
ranks before the clamp, as TRL gathers them), LoRA / QLoRA / full, gradient accumulation, schedules, eval
(on rank 0), checkpoints and ``--resume`` (the same weights as a run never stopped), Parquet logs and
trackers as for pairs; batches are random (no length grouping). Logged:
rewards_chosen = mean β Δ over desirable examples, rewards_rejected = over undesirable ones, their
difference as rewards_margins (TRL's rewards/margins), logps likewise, and kl (z); no accuracies.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from prefcache import __version__
from prefcache.cache.compat import check_cache_matches
from prefcache.cache.lookup import UnpairedReference
from prefcache.core.atomic import write_table_atomic
from prefcache.core.distributed import all_reduce_sum, barrier, gather, setup
from prefcache.core.runconfig import write_config
from prefcache.data.pairs import write_bad_rows
from prefcache.data.unpaired import check_no_mapping, kl_sequence, load_unpaired
from prefcache.losses.unpaired import UNPAIRED, kl_estimate
from prefcache.model.kernel import LogProbModule, collate, token_logprobs
from prefcache.model.load import load_tokenizer, resolve_device, resolve_model
from prefcache.training.checkpoint import checkpoint_dir
from prefcache.training.guards import resolve_finetune
from prefcache.training.log import EXAMPLE_SCHEMA, PAIRS_SCHEMA, peak_mem_mb
from prefcache.training.rundir import write_run_info
from prefcache.training.state import (
    RunState,
    after_step,
    epoch_order,
    finish,
    held_out_ids,
    load_run_policy,
    make_optimization,
    open_run,
    step_counts,
)
from prefcache.training.trackers import Trackers


def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], *, pad_id: int, device, chunk_size: int):
    """Summed completion log-probs [N] (fp32) of (prompt ids, completion ids) sequences, and real tokens."""
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


@dataclass
class UnpairedData:
    """The examples of an unpaired run, checked against their caches before a model loads."""

    items: list  # TokenizedCompletion, training
    eval_items: list
    reference: UnpairedReference
    eval_reference: UnpairedReference
    by_id: dict  # id -> TokenizedCompletion of both splits: KL partners may sit in either
    examples: list  # the rendered texts, for pairs.parquet
    bad_rows: list
    max_length: int
    truncation: str


def load_unpaired_data(cfg, tokenizer) -> UnpairedData:
    """Training and held-out examples, each with a cached value, its cached token counts, and a KL partner."""
    reference = UnpairedReference.from_cache(cfg.cache)
    max_length = cfg.max_length or reference.metadata["max_length"]
    truncation = cfg.truncation or reference.metadata["truncation"]
    check_cache_matches(reference.metadata, tokenizer, max_length, truncation)
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
    by_id = {i.id: i for i in items + eval_items}
    if missing := sorted({r.partner(i.id) for r, its in ((reference, items), (eval_reference, eval_items))
                          for i in its} - by_id.keys()):
        raise ValueError(f"{len(missing)} KL completions come from examples not in the data, e.g. {missing[:3]}")
    return UnpairedData(items, eval_items, reference, eval_reference, by_id, examples + eval_examples, bad_rows,
                        max_length, truncation)


def write_texts(path: Path, examples) -> None:
    """RUN/pairs.parquet for unpaired examples: a desirable completion as chosen, an undesirable one as rejected."""
    texts = {c: [] for c in PAIRS_SCHEMA.names}
    for e in examples:
        for c, v in (("id", e.id), ("prompt", e.prompt), ("chosen", e.completion if e.label else None),
                     ("rejected", None if e.label else e.completion)):
            texts[c].append(v)
    write_table_atomic(pa.Table.from_pydict(texts, schema=PAIRS_SCHEMA), path)


def log_step(run: RunState, split: str, at_step: int, cols, loss, kl, extra=None) -> dict:
    row = aggregate_unpaired(cols) | {"loss": loss, "kl": kl, "step": at_step, "epoch": run.epoch(at_step),
                                      "split": split, "time_s": run.elapsed(), "peak_mem_mb": peak_mem_mb(run.device),
                                      **(extra or {})}
    run.log.add_examples({c: cols[c] for c in EXAMPLE_SCHEMA.names if c in cols}, step=at_step, split=split)
    run.log.add_step(row)
    run.trackers.log(row, step=at_step, split=split)
    return row


def run_eval(run: RunState, data: UnpairedData, plain, at_step: int) -> None:
    """Rank 0 evaluates every held-out example with the unwrapped model (the KL batches are then those of
    one process); the other ranks wait."""
    run.last_eval_step = at_step
    if run.main:
        cfg = run.cfg
        batch_size = cfg.eval_batch_size or cfg.batch_size
        common = {"pad_id": run.tokenizer.pad_token_id, "device": run.device, "max_length": data.max_length,
                  "truncation": data.truncation}
        run.policy.eval()
        parts = []
        with torch.no_grad():
            for s in range(0, len(data.eval_items), batch_size):
                chunk = data.eval_items[s : s + batch_size]
                parts.append((len(chunk), *batch_loss(plain, chunk, data.eval_reference, data.by_id, cfg, **common)))
        run.policy.train()
        cols = {k: [v for p in parts for v in p[2][k]] for k in parts[0][2]}
        n = sum(p[0] for p in parts)
        run.last_eval = log_step(run, "eval", at_step, cols, sum(p[0] * float(p[1]) for p in parts) / n,
                                 sum(p[0] * p[3] for p in parts) / n)
    barrier(run.world)


def train_step(run: RunState, data: UnpairedData, module, plain, order: list[int]) -> None:
    """One optimizer step over this rank's share of the step's examples, logged every ``log_every`` steps."""
    cfg, world = run.cfg, run.world
    common = {"pad_id": run.tokenizer.pad_token_id, "device": run.device, "max_length": data.max_length,
              "truncation": data.truncation}
    # TRL gathers the per-process KL means and averages them, then clamps
    train_kl = {"kl_model": plain, "reduce": (lambda v: all_reduce_sum(v, world) / world) if world > 1 else None}
    span = cfg.batch_size * cfg.grad_accum
    position = run.step % run.steps_per_epoch
    step_idx = order[position * span : (position + 1) * span]
    t0 = time.perf_counter()
    loss_sum, kl_sum, tokens, cols = 0.0, 0.0, 0, []
    for k in range(0, len(step_idx), cfg.batch_size):
        batch = [data.items[i] for i in step_idx[k : k + cfg.batch_size]]
        # DDP all-reduces gradients on the last micro-batch of the step only.
        last = k + cfg.batch_size >= len(step_idx)
        with module.no_sync() if world > 1 and not last else nullcontext():
            loss, part, kl, n_tokens = batch_loss(module, batch, data.reference, data.by_id, cfg, **common, **train_kl)
            (loss * (len(batch) / len(step_idx))).backward()  # the step's gradient: the mean over its examples
        loss_sum, kl_sum, tokens = loss_sum + loss.item() * len(batch), kl_sum + kl * len(batch), tokens + n_tokens
        cols.append(part)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or math.inf).item()
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    if run.due(cfg.log_every):
        parts = gather(({c: [v for p in cols for v in p[c]] for c in cols[0]}, loss_sum, kl_sum, tokens), world)
        if run.main:
            cols = {c: [v for p in parts for v in p[0][c]] for c in parts[0][0]}
            n = len(cols["id"])
            run.last_train = log_step(run, "train", run.step, cols, sum(p[1] for p in parts) / n,
                                      sum(p[2] for p in parts) / n,
                                      {"lr": lr, "grad_norm": grad_norm,
                                       "tokens_per_s": sum(p[3] for p in parts) / (time.perf_counter() - t0)})


def train_unpaired(cfg) -> dict:
    """``prefcache train --loss kto`` (or apo_zero_unpaired): see the module docstring."""
    if cfg.cache is None:
        raise ValueError(f"--loss {cfg.loss[0]} needs an unpaired reference cache (prefcache precompute --unpaired)")
    check_no_mapping(cfg)
    if UNPAIRED[cfg.loss[0]][1] and cfg.batch_size < 2:  # TRL refuses it too: z would be the example's own reward
        raise ValueError("kto estimates its KL term over the micro-batch: --batch-size must be at least 2")
    rank, world, device = setup(resolve_device(cfg.device))
    out = Path(cfg.out)  # prefcache.training.loop.train checked it: a new run, or a resume of one
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source)
    data = load_unpaired_data(cfg, tokenizer)
    cfg = replace(cfg, finetune=resolve_finetune(cfg.finetune, data.reference.metadata, device)[0])
    steps_per_epoch, total_steps = step_counts(cfg, len(data.items), world)
    # the data order is random here (no length grouping), a function of (seed, epoch)
    ckpt, state, log = open_run(replace(cfg, group_by_length=False), world=world, main=rank == 0,
                                n_train=len(data.items))
    run = RunState(cfg, out, rank, world, device, steps_per_epoch, total_steps, len(data.items), data.max_length,
                   data.truncation, log, tokenizer=tokenizer)
    if run.main:
        write_texts(out / "pairs.parquet", data.examples)
        if data.bad_rows:
            write_bad_rows(out / "bad_rows.jsonl", data.bad_rows)

    run.policy, run.policy_info = load_run_policy(cfg, source, ckpt, device)
    plain = module = LogProbModule(run.policy, chunk_size=cfg.chunk_size)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    run.optimizer, run.scheduler, warmup = make_optimization(cfg, params, total_steps=total_steps, state=state)
    run.restore(state)
    run_info = {"config": asdict(cfg), "prefcache_version": __version__, "world_size": world,
                "max_length": data.max_length, "truncation": data.truncation, "policy": run.policy_info,
                "cache": data.reference.metadata, "train_pairs": len(data.items), "train_examples": len(data.items),
                "eval_examples": len(data.eval_items), "bad_rows": len(data.bad_rows),
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
                "resumed_from": str(ckpt) if ckpt else None,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if run.main:
        write_run_info(out, run_info)
        write_config(cfg, out / "config.yaml")
    run.trackers = Trackers(cfg.report_to if run.main else (), out, run_info, state["step"] if state else None)
    run.start_clock()

    evaluate = (lambda at_step: run_eval(run, data, plain, at_step)) if data.eval_items else None
    if evaluate and run.step == 0:
        evaluate(0)
    bar = tqdm(total=total_steps, initial=run.step, desc=f"train {cfg.loss[0]}", unit="step",
               disable=not (run.main and cfg.progress))
    order, order_epoch = None, None
    while run.step < total_steps:
        if order_epoch != (epoch := run.step // steps_per_epoch):
            order, order_epoch = epoch_order(len(data.items), cfg.seed, epoch, rank, world), epoch
        train_step(run, data, module, plain, order)
        bar.update(1)
        after_step(run, evaluate)
    bar.close()
    finish(run, evaluate)
    strip = lambda row: {k: v for k, v in row.items() if k not in ("n", "split", "step", "epoch")}  # noqa: E731
    summary = {"run": str(out), "steps": run.step, "final_checkpoint": str(checkpoint_dir(out, run.step)),
               "train": strip(run.last_train),
               "eval": strip(run.last_eval) | {"n": run.last_eval["n"]} if run.last_eval else {},
               "seconds": run.elapsed(), "resumed_from": str(ckpt) if ckpt else None}
    if run.main:
        write_run_info(out, run_info | {"result": summary})
    barrier(world)
    return summary
