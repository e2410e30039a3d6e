"""The training loop: preference optimisation against a precomputed reference cache, one loop for every
kind of example.

Only the policy is loaded. A kind of example is a task (:mod:`prefcache.training.task`): preference pairs
(:class:`~prefcache.training.pairs.PairTask`; with images for a vision-language model, see
:mod:`prefcache.training.vision`) or unpaired KTO-style examples (:class:`~prefcache.training.unpaired.UnpairedTask`).
The task loads and checks its examples and reference values before a model loads and runs the forward of a
micro-batch; everything else is written here once, so every kind gets every guard.

The loop reads top to bottom: seeded epoch-wise data order (length-grouped) -> micro-batches with gradient
accumulation -> loss -> the NaN/inf guard -> clip -> optimizer and LR schedule -> log / eval / checkpoint.
Under ``torchrun`` each rank takes every world_size-th example of the epoch's permutation
(DistributedSampler's split) and DDP averages the gradients (with ``--fsdp``, FSDP2 shards the policy and
reduce-scatters them: :mod:`prefcache.training.sharded`); rank 0 writes the logs with metrics gathered from all ranks.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefcache import __version__
from prefcache.core.distributed import barrier, dist_info, gather, setup
from prefcache.core.locking import directory_lock
from prefcache.core.runconfig import write_config
from prefcache.data.pairs import write_bad_rows
from prefcache.losses.registry import UNPAIRED_LOSSES
from prefcache.model.kernel import LogProbModule, router_aux_coef
from prefcache.model.load import resolve_device, resolve_model
from prefcache.model.packing import training_sharing
from prefcache.model.sharding import shard
from prefcache.training.checkpoint import check_same_objective, checkpoint_dir
from prefcache.training.config import TrainConfig, loss_settings
from prefcache.training.guards import STEP0_MARGIN_TOLERANCE, check_step, resolve_finetune
from prefcache.training.log import peak_mem_mb
from prefcache.training.pairs import PairTask, example_cols  # noqa: F401 - example_cols: a public name here
from prefcache.training.rundir import CONFIG_YAML, check_run_dir, saved_options, write_run_info
from prefcache.training.sharded import SHARDED_DIR, evaluate_share, load_sharded, note_unsharded, total_norm
from prefcache.training.state import (  # noqa: F401 - epoch_order: a public name here
    RunState,
    after_step,
    epoch_order,
    fingerprints,
    finish,
    load_run_policy,
    make_optimization,
    no_stores_left_on_refusal,
    open_run,
    step_counts,
)
from prefcache.training.task import PolicyModel, Totals
from prefcache.training.trackers import Trackers
from prefcache.training.unpaired import UnpairedTask
from prefcache.training.vision import run_tokenization


def train(config: TrainConfig | None = None, **options) -> dict:
    """Train a policy on ``config.data`` against the reference cache ``config.cache``.

    ``train(data="prefs.jsonl", cache="ref-cache", out="run1", max_steps=100)`` is the same as the CLI, and
    ``train(out="run1", resume=True, max_steps=200)`` continues run1 with the options it saved, the keyword
    arguments given being the changes (a resume refuses another loss, other data or another cache).
    Returns a summary: run dir, steps, final checkpoint path, the last logged train and eval metrics,
    seconds, and the checkpoint it resumed from (or None).
    """
    if config is None and options.get("resume") and options.get("out"):
        options = {**resumed_options(options["out"]), **options}
    cfg = config or TrainConfig(**options)
    check_run_dir(cfg.out, cfg.resume)  # before the lock, so a refusal leaves nothing behind
    if cfg.resume:
        check_same_objective(cfg.out, loss_settings(cfg))  # before the data is read: a refusal costs nothing
    # One writer per run directory; ranks > 0 write nothing there.
    with directory_lock(cfg.out, "prefcache train", enabled=dist_info()[0] == 0):
        kind = UnpairedTask if cfg.loss[0] in UNPAIRED_LOSSES else PairTask
        kind.refuse(cfg)
        run, task, model, run_info = start(cfg, kind)
        return _train(run, task, model, run_info)


def resumed_options(out: str) -> dict:
    """A resume continues the run: the keyword arguments not passed are the options it saved, as for the
    CLI's ``--resume`` (a :class:`TrainConfig` passed whole is taken as it is)."""
    saved = saved_options(out)
    if unknown := sorted(saved.keys() - {f.name for f in fields(TrainConfig)}):
        raise ValueError(f"{Path(out) / CONFIG_YAML}: unknown option(s) {', '.join(unknown)}; pass a TrainConfig "
                         "with the run's options")
    return saved


def seed_rank(seed: int, rank: int) -> None:
    """Each rank's own seed: dropout differs per rank, as in any data-parallel run."""
    torch.manual_seed(seed + rank)


def build_model(cfg: TrainConfig, policy, task, tokenizer, device: str, world: int, processor=None) -> PolicyModel:
    """The kernel's module over the policy (DDP-wrapped under torchrun, or sharded in place with ``--fsdp``: then
    every pass goes through it), and what every step passes it (``processor``: a VLM's). Prefix sharing follows
    the cache's ``prefix_sharing`` metadata unless asked otherwise (no key: off)."""
    plain = module = LogProbModule(policy, chunk_size=cfg.chunk_size, router_aux=True)
    if world > 1 and cfg.fsdp:
        plain = module = shard(module, policy, device, cfg.bf16)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[device] if device.startswith("cuda") else None)
    return PolicyModel(module, plain, policy, [p for p in policy.parameters() if p.requires_grad],
                       training_sharing(cfg.prefix_sharing, task.cache_meta, policy), router_aux_coef(policy),
                       tokenizer.pad_token_id, device, cfg.chunk_size, cfg.bf16, processor)


def start(cfg: TrainConfig, kind) -> tuple[RunState, object, PolicyModel, dict]:
    """Everything before the first step: data and cache checked, run directory, policy, optimizer, run.json."""
    rank, world, device = setup(resolve_device(cfg.device))
    main, out = rank == 0, Path(cfg.out)
    # 1. Tokenizer, reference cache and data: everything is checked before a model is loaded.
    source = resolve_model(cfg.model, cfg.revision)
    tokenizer, processor = run_tokenization(cfg, source)  # processor: a vision-language model's, else None
    with no_stores_left_on_refusal(cfg, main):  # a refused resume leaves the run directory as it was
        task = kind.load(cfg, tokenizer, processor)
        finetune, mismatch = resolve_finetune(cfg.finetune, task.cache_meta, device)
        cfg = replace(cfg, finetune=finetune)  # run.json and checkpoints record the policy actually trained
        if cfg.fsdp:
            note_unsharded(world, main)
        if mismatch and main:
            print(f"prefcache train: warning: {mismatch}", file=sys.stderr)
        n_train = len(task.train_set)
        steps_per_epoch, total_steps = step_counts(cfg, n_train, world)

        # 2. The run directory: a fresh one, or a resume from its latest checkpoint.
        if (notice := check_run_dir(out, cfg.resume)) and main:
            print(f"prefcache train: {notice}", file=sys.stderr)
        prints = fingerprints(task)
        ckpt, state, log, grouped = open_run(cfg, world=world, main=main, n_train=n_train, unpaired=kind is UnpairedTask,
                                             fingerprints=prints)
    if main:
        task.write_texts(out / "pairs.parquet")
        if task.bad_rows:
            write_bad_rows(out / "bad_rows.jsonl", task.bad_rows)

    # 3. The policy (only it), its optimizer and schedule; DDP wraps the module whose forward runs.
    policy, policy_info = load_run_policy(cfg, source, ckpt, device)
    model = build_model(cfg, policy, task, tokenizer, device, world, processor)
    restore = None  # a --fsdp checkpoint's model and optimizer state, re-sharded for this run's ranks
    if state and state.get("sharded"):
        restore = lambda optimizer: load_sharded(ckpt / SHARDED_DIR, model.plain, optimizer)  # noqa: E731
    optimizer, scheduler, warmup = make_optimization(cfg, model.params, total_steps=total_steps, state=state,
                                                     restore=restore)
    seed_rank(cfg.seed, rank)
    run_info = {"config": asdict(cfg), "prefcache_version": __version__, "world_size": world,
                "max_length": task.max_length, "truncation": task.truncation, "policy": policy_info, **task.info(),
                "bad_rows": len(task.bad_rows), "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                "warmup_steps": warmup, "pairs_per_step": cfg.batch_size * cfg.grad_accum * world,
                "prefix_sharing": model.sharing, "group_by_length": grouped, "fingerprints": prints,
                "resumed_from": str(ckpt) if ckpt else None,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if main:
        write_run_info(out, run_info)
        write_config(cfg, out / CONFIG_YAML)  # `prefcache train --config RUN/config.yaml` runs it again
    trackers = Trackers(cfg.report_to if main else (), out, run_info, state["step"] if state else None)
    run = RunState(cfg=cfg, out=out, rank=rank, world=world, device=device, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps, n_train=n_train, max_length=task.max_length, truncation=task.truncation,
                   group_by_length=grouped, log=log, policy=policy, policy_info=policy_info, tokenizer=processor
                   or tokenizer,  # checkpoints save it: a VLM's processor, its tokenizer files included
                   optimizer=optimizer, scheduler=scheduler, trackers=trackers, fingerprints=prints,
                   module=model.plain)
    run.restore(state)
    return run, task, model, run_info


def _train(run: RunState, task, model: PolicyModel, run_info: dict) -> dict:
    """The loop: seeded epoch order -> a step of micro-batches -> log / eval / checkpoint; then the summary."""
    cfg = run.cfg
    run.start_clock()
    evaluate = (lambda at_step: run_eval(run, task, model, at_step)) if task.eval_set else None
    if evaluate and run.step == 0:
        evaluate(0)  # the baseline: at step 0 a fresh LoRA policy is the reference
    bar = tqdm(total=run.total_steps, initial=run.step, desc=f"train {'+'.join(cfg.loss)}", unit="step",
               disable=not (run.main and cfg.progress), dynamic_ncols=True)
    order, order_epoch = None, None
    while run.step < run.total_steps:
        if order_epoch != (epoch := run.step // run.steps_per_epoch):  # a fresh seeded permutation each epoch
            lengths = task.lengths() if run.group_by_length else None
            order = epoch_order(len(task.train_set), cfg.seed, epoch, run.rank, run.world, lengths,
                                cfg.batch_size * cfg.grad_accum)
            order_epoch = epoch
        loss = train_step(run, task, model, order)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        after_step(run, evaluate)
    bar.close()
    finish(run, evaluate)

    ckpt = run_info["resumed_from"]
    summary = {"run": str(run.out), "steps": run.step, "final_checkpoint": str(checkpoint_dir(run.out, run.step)),
               "train": {k: v for k, v in run.last_train.items() if k != "n"}, "eval": run.last_eval,
               "seconds": run.elapsed(), "resumed_from": ckpt, "step0_margin": run.step0_margin}
    if run.main:
        write_run_info(run.out, run_info | {"result": summary})
    barrier(run.world)
    return summary


def train_step(run: RunState, task, model: PolicyModel, order: list[int]) -> float:
    """One optimizer step over this rank's share of the step's examples; returns its mean loss."""
    cfg = run.cfg
    span = cfg.batch_size * cfg.grad_accum
    position = run.step % run.steps_per_epoch
    step_idx = order[position * span : (position + 1) * span]
    micro = [step_idx[i : i + cfg.batch_size] for i in range(0, len(step_idx), cfg.batch_size)]
    t0 = time.perf_counter()
    totals = Totals()
    for k, idx in enumerate(micro):
        batch = [task.train_set[i] for i in idx]
        with grad_sync(model.module, run.world, last=k == len(micro) - 1):
            out = task.forward(model, batch, run)
            check_step(run.step + 1, [e.id for e in batch], out.losses, unit=task.unit)  # NaN never reaches weights
            loss, aux = out.loss, model.aux_loss
            if aux is not None:
                loss = loss + model.aux_coef * aux  # a mixture of experts also learns to balance its router
            # Each micro-batch's mean, weighted by its share of the step: the step's gradient is that of the
            # mean over all its examples, whatever the split into micro-batches.
            (loss * (len(batch) / len(step_idx))).backward()
        totals.add(out, len(batch), aux)

    grad_norm = total_norm(torch.nn.utils.clip_grad_norm_(model.params, cfg.max_grad_norm or math.inf))
    check_step(run.step + 1, totals.columns["id"], torch.zeros(0), grad_norm, unit=task.unit)  # the step's ids, in order
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    step_time = time.perf_counter() - t0
    if run.step == 1 and run.main:  # step 1's numbers are the step-0 policy's
        report_step0(run, task.step0_margin(task.metrics(totals.columns)), totals.loss_sum / totals.n)
    if run.due(cfg.log_every):
        totals.peak_mem_mb = peak_mem_mb(run.device)
        log_train(run, task, gather(totals, run.world), lr=lr, grad_norm=grad_norm, step_time=step_time)
    return totals.loss_sum / totals.n


def grad_sync(module, world: int, *, last: bool):
    """Gradients are averaged over the ranks on the last micro-batch of a step only: DDP's ``no_sync`` before
    it, FSDP's reduce-scatter switched off before it."""
    if world == 1:
        return nullcontext()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(last)
        return nullcontext()
    return nullcontext() if last else module.no_sync()


def report_step0(run: RunState, margin: float | None, loss: float) -> None:
    """Say whether the policy starts as the cache's reference (pairs: margin 0, sigmoid loss ln 2)."""
    if margin is None:
        return
    run.step0_margin = margin
    print(f"prefcache train: step 0 margin {margin:.4g}, loss {loss:.4f} "
          f"(0 and ln 2 = 0.6931 when the policy starts as the cache's reference)"
          + ("; the policy is NOT the cache's reference" if abs(margin) > STEP0_MARGIN_TOLERANCE else ""),
          file=sys.stderr)


def log_row(run: RunState, task, parts: list[Totals], split: str, at_step: int, extra=lambda t: {}) -> dict:
    """Rank 0: log a step's (or an eval's) examples and metrics, gathered from every rank; returns the
    summary entry (the task's metrics, the mean loss and, where there is one, the mean KL estimate)."""
    t = Totals.merge(parts)
    result = task.metrics(t.columns) | {"loss": t.loss_sum / t.n}
    if t.kl_sum is not None:
        result["kl"] = t.mean(t.kl_sum)
    run.log.add_examples(t.columns, step=at_step, split=split)
    run.log.add_step(row := {**result, "step": at_step, "epoch": run.epoch(at_step), "split": split,
                             "peak_mem_mb": t.peak_mem_mb, "time_s": run.elapsed(), **extra(t)})
    run.trackers.log(row, step=at_step, split=split)
    return result


def log_train(run: RunState, task, parts: list[Totals], *, lr: float, grad_norm: float, step_time: float) -> None:
    if run.main:
        run.last_train = log_row(run, task, parts, "train", run.step, extra=lambda t: {
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": t.tokens / step_time,
            "padding_share": 1 - t.tokens / max(t.positions, 1),  # the share of computed positions that were padding
            "aux_loss": t.mean(t.aux_sum)})


def run_eval(run: RunState, task, model: PolicyModel, at_step: int) -> None:
    """Score the held-out examples (each rank its share), logged by rank 0 as the eval split of ``at_step``."""
    totals = evaluate_share(task, model, run)
    totals.peak_mem_mb = peak_mem_mb(run.device)
    parts = gather(totals, run.world)
    if run.main:
        run.last_eval = log_row(run, task, parts, "eval", at_step)
    run.last_eval_step = at_step
