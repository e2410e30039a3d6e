"""A training run's machinery, used by the one loop (:mod:`prefcache.training.loop`) for every kind of
example: the run directory opened or resumed, the policy and its optimizer built (or restored from a
checkpoint), the seeded data order, and :class:`RunState`, what the loop carries from step to step and
writes into its checkpoints (:func:`prefcache.training.checkpoint.save`).
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prefcache.cache.lookup import example_ids
from prefcache.cache.store import identity
from prefcache.core.distributed import barrier, dist_info
from prefcache.data.store import store_folder
from prefcache.losses import RunningMean
from prefcache.model.load import resolve_model
from prefcache.model.policy import load_policy
from prefcache.model.tokenization import tokenizer_key
from prefcache.training.checkpoint import (
    check_resumable,
    clean_temporaries,
    latest_checkpoint,
    load_trainer_state,
    resumed_grouping,
    save,
    set_rng_state,
)
from prefcache.training.log import RunLog
from prefcache.training.schedule import make_scheduler
from prefcache.training.trackers import Trackers


@dataclass(kw_only=True)
class RunState:
    """One training run: what is fixed when it starts (everything it is built with), and how far it has got.

    The loop advances ``step``; :func:`~prefcache.training.checkpoint.save` and the evals read the rest.
    ``bco`` is bco_pair's running reward mean (unused by other losses, saved all the same).
    """

    cfg: object  # TrainConfig
    out: Path
    rank: int
    world: int
    device: str
    steps_per_epoch: int
    total_steps: int
    n_train: int
    max_length: int
    truncation: str
    group_by_length: bool
    log: RunLog
    policy: object
    policy_info: dict
    tokenizer: object
    optimizer: object
    scheduler: object
    trackers: Trackers
    step: int = 0
    last_eval_step: int | None = None
    last_saved: int | None = None
    t_start: float = field(default_factory=time.perf_counter)  # see start_clock
    elapsed_before: float = 0.0  # seconds trained before a resume
    last_train: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    bco: RunningMean = field(default_factory=RunningMean)
    step0_margin: float | None = None  # the first step's margin (pairs), measured on the starting policy
    fingerprints: dict = field(default_factory=dict)  # what it trains on (see fingerprints), saved for a resume
    module: object = None  # the kernel's module over the policy: what --fsdp checkpoints save (sharded or not)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def epoch(self, at_step: int) -> float:
        return at_step / self.steps_per_epoch

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def restore(self, state: dict | None) -> None:
        """Continue from a checkpoint's trainer state: its step, clock, eval step, bco mean and RNGs."""
        if not state:
            return
        if self.rank < len(state["rng"]):  # resumed on more ranks: a new rank keeps its own seed
            set_rng_state(state["rng"][self.rank])
        self.step, self.last_saved, self.last_eval_step = state["step"], state["step"], state["last_eval_step"]
        self.elapsed_before = state["elapsed_s"]
        self.bco.load_state_dict(state["bco"])

    def start_clock(self) -> None:
        """Training time starts now (model loading is not part of it), plus the time before a resume."""
        self.t_start = time.perf_counter() - self.elapsed_before

    def due(self, every: int | None) -> bool:
        """Whether something done every ``every`` steps (and at the last step) is due now."""
        return bool(every and self.step % every == 0) or self.step == self.total_steps


def step_counts(cfg, n_train: int, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): each rank takes every world_size-th example, and a step is
    ``batch_size * grad_accum`` of them per rank; ``max_steps`` overrides ``epochs``."""
    steps_per_epoch = math.ceil(math.ceil(n_train / world) / (cfg.batch_size * cfg.grad_accum))
    return steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch


def held_out_ids(ids: list[str], fraction: float) -> set[str]:
    """The eval share of the training ids, picked by a hash of the id: the same ids whatever the row order."""
    k = max(1, round(fraction * len(ids)))
    return set(sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())[:k])


def fingerprints(task) -> dict:
    """What a resume must find again, as short hashes: the training examples' ids in their order (the data
    order is a permutation of positions, so the same ids in another order would not continue the run), the
    held-out ones (None: no eval), and each cache's :func:`~prefcache.cache.store.identity` (None: no cache)."""
    def ids(examples):
        return hashlib.sha256("\n".join(example_ids(examples)).encode()).hexdigest()[:16] if len(examples) else None

    def cache(reference):
        return identity(reference.metadata) if reference is not None else None

    return {"data": ids(task.train_set), "eval_data": ids(task.eval_set), "cache": cache(task.reference),
            "eval_cache": cache(task.eval_reference) if task.eval_set else None}


def store_options(cfg, tokenizer, processor=None) -> dict:
    """Where a run's data stores are (:mod:`prefcache.data.store`) and the tokenizer's part of their key (a
    vision-language model's: with its processor's fingerprint)."""
    return {"tokenizer_key": tokenizer_key(tokenizer, processor), "folder": store_folder(cfg.out),
            "world": dist_info()[1]}


@contextmanager
def no_stores_left_on_refusal(cfg, main: bool):
    """A resume refused (other data, another cache, other settings) leaves its run as it was: the data stores
    written into ``RUN/data`` on the way there are removed again. Stores under ``$PREFCACHE_HOME`` are shared
    and stay."""
    folder, run = store_folder(cfg.out), Path(cfg.out)
    inside = main and cfg.resume and run.resolve() in folder.resolve().parents
    existed = folder.exists()
    before = set(folder.iterdir()) if inside and existed else set()
    try:
        yield
    except Exception:
        if inside and folder.exists():
            for path in set(folder.iterdir()) - before:
                path.unlink(missing_ok=True)
            if not existed and not any(folder.iterdir()):
                folder.rmdir()
        raise


def split_held_out(rows, fraction: float):
    """(training rows, held-out rows): the held-out share of a data store's view, by :func:`held_out_ids`."""
    held = rows.isin(held_out_ids(rows.ids(), fraction))
    return rows.where(~held), rows.where(held)


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int, lengths: list[int] | None = None,
                span: int = 1) -> list[int]:
    """This rank's pair indices for an epoch: a permutation seeded by (seed + epoch), padded to a multiple
    of world_size by wrapping around, then every world_size-th index (as torch's DistributedSampler).

    With ``lengths`` (tokens per pair, a data store's ``tokens`` column), length-grouped as transformers' ``group_by_length``: the permutation
    is cut into mega-batches of up to 50 steps' pairs (``span`` pairs per step per rank, times world_size;
    fewer on small data), each sorted longest first, so a micro-batch holds pairs of similar length. Still
    a function of (seed, epoch, rank, world, lengths, span) only: resume and data parallelism are unchanged,
    and a step sees the same pairs whatever its split into micro-batches or ranks.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
    if lengths is not None:
        lengths = np.asarray(lengths, dtype=np.int64)
        step = span * world
        mega = step * max(1, min(n // (4 * step), 50))
        for s in range(0, n, mega):  # a stable sort, longest first: ties keep their permuted order
            chunk = perm[s : s + mega]
            perm[s : s + mega] = chunk[np.argsort(-lengths[chunk], kind="stable")]
    per_rank = math.ceil(n / world)
    perm = np.concatenate([perm, perm[: per_rank * world - n]])
    return perm[rank::world].tolist()


def make_optimizer(cfg, params):
    """AdamW (torch), or bitsandbytes' 8-bit / paged 8-bit AdamW. Weight decay on matrices only."""
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.optimizer == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(groups, lr=cfg.lr)


def open_run(cfg, *, world: int, main: bool, n_train: int, unpaired: bool = False,
             fingerprints: dict | None = None):
    """(checkpoint resumed from, its trainer state, the run's log, whether batches are length-grouped) for a
    fresh run or a ``--resume``.

    Refuses a resume with another data order, other examples or another cache (``fingerprints``: this run's
    :func:`fingerprints`; :func:`~prefcache.training.checkpoint.check_resumable`; an unpaired run of the loop
    of before keeps its random batches, see ``resumed_grouping``), before anything is written; then, on rank 0,
    removes what a killed run left half-written and drops the rows logged after the checkpoint (they are
    logged again).
    """
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    state = load_trainer_state(ckpt) if ckpt else None
    group = resumed_grouping(state, cfg.group_by_length, unpaired)
    if state:
        check_resumable(state, world=world, n_train=n_train, cfg=cfg, group_by_length=group,
                        fingerprints=fingerprints)
    barrier(world)  # every rank has looked at the run dir before rank 0 starts writing to it
    log = RunLog(out, enabled=main)
    if main:
        clean_temporaries(out)
        log.truncate(state["step"] if state else -1)
    return ckpt, state, log, group


def load_run_policy(cfg, source, ckpt: Path | None, device: str):
    """(policy, info): the starting weights, or a resumed checkpoint's (a full fine-tune's own weights, or
    its adapter on the base). Seeded first: LoRA's A matrices are random."""
    torch.manual_seed(cfg.seed)
    full_ckpt = ckpt and cfg.finetune == "full"
    return load_policy(resolve_model(str(ckpt)) if full_ckpt else source, finetune=cfg.finetune, device=device,
                       adapter=None if full_ckpt else (ckpt or cfg.adapter), lora_r=cfg.lora_r,
                       lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, lora_target=cfg.lora_target,
                       gradient_checkpointing=cfg.gradient_checkpointing, shardable=cfg.fsdp,
                       train_vision=cfg.train_vision)


def make_optimization(cfg, params, *, total_steps: int, state: dict | None, restore=None):
    """(optimizer, scheduler, warm-up steps) over ``params``, restored from ``state`` on resume (or by
    ``restore(optimizer)``: a --fsdp checkpoint's sharded state)."""
    optimizer = make_optimizer(cfg, params)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = make_scheduler(optimizer, cfg.scheduler, warmup=warmup, total=total_steps, peak_lr=cfg.lr)
    if state:
        if restore:
            restore(optimizer)
        else:
            optimizer.load_state_dict(state["optimizer"])
        # The lr is recomputed from the step and this run's total (never the saved schedule's): extending
        # a finished run trains its new steps at a real lr.
        scheduler = make_scheduler(optimizer, cfg.scheduler, warmup=warmup, total=total_steps, peak_lr=cfg.lr,
                                   done=state["step"])
    return optimizer, scheduler, warmup


def after_step(run: RunState, evaluate=None) -> None:
    """What follows each optimizer step: ``evaluate(step)`` (None: no held-out data) every ``eval_every``
    steps, a checkpoint every ``save_every``, both at the last step too; a new log part every
    ``flush_every`` logged steps."""
    if evaluate and run.due(run.cfg.eval_every):
        evaluate(run.step)
    if run.due(run.cfg.save_every):
        save(run, run.step)
    if run.log.pending >= run.cfg.flush_every:
        run.log.flush()


def finish(run: RunState, evaluate=None) -> None:
    """After the loop: the final eval and checkpoint unless made already (a resume of a finished run makes
    them here), the logs flushed, the trackers closed."""
    if evaluate and run.last_eval_step != run.step:
        evaluate(run.step)
    if run.last_saved != run.step:
        save(run, run.step)
    run.log.flush()
    run.trackers.close()
