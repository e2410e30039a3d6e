"""The training loop: preference optimisation against a precomputed reference cache.

Only the policy is loaded. The reference model's summed log-probs come from the cache, joined to each
batch by example id (never by row order), after checking that the cache was made with the tokenisation
training is about to use. Policy log-probs come from the kernel that made the cache
(``prefcache.model.kernel`` through ``scoring.pair_logps``), so a fresh LoRA policy on the reference model
starts with rewards of 0 and a sigmoid loss of ln 2 (to 1e-5, at the precision the cache was made in;
QLoRA on a 4-bit cache included).

The loop reads top to bottom: seeded epoch-wise data order -> micro-batches with gradient accumulation
-> loss -> clip -> optimizer and LR schedule -> log / eval / checkpoint. Under ``torchrun`` each rank
takes every world_size-th pair of the epoch's permutation (DistributedSampler's split) and DDP averages
the gradients; rank 0 writes the logs with metrics gathered from all ranks.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from prefcache import __version__
from prefcache.cache.compat import check_cache_mapping, check_cache_matches
from prefcache.cache.lookup import ReferenceTable, check_joined, check_reference_values
from prefcache.core.distributed import all_reduce_sum, barrier, dist_info, gather, setup
from prefcache.core.locking import directory_lock
from prefcache.core.runconfig import write_config
from prefcache.core.schemas import EXAMPLE_COLUMNS, example_columns
from prefcache.data.columns import RowMapping
from prefcache.data.pairs import load_dataset_pairs, write_bad_rows
from prefcache.losses import LossInputs, combined_loss, ld_logps
from prefcache.losses.registry import UNPAIRED_LOSSES
from prefcache.model.kernel import LogProbModule, router_aux_coef
from prefcache.model.load import load_tokenizer, resolve_device, resolve_model
from prefcache.model.packing import training_sharing
from prefcache.model.pairs import PairLogps, pair_logps
from prefcache.training.checkpoint import checkpoint_dir
from prefcache.training.config import TrainConfig
from prefcache.training.guards import STEP0_MARGIN_TOLERANCE, check_step, resolve_finetune
from prefcache.training.log import peak_mem_mb, write_pairs
from prefcache.training.rundir import check_run_dir, write_run_info
from prefcache.training.scoring import aggregate, score_pairs
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
from prefcache.training.unpaired import train_unpaired


def train(config: TrainConfig | None = None, **options) -> dict:
    """Train a policy on ``config.data`` against the reference cache ``config.cache``.

    ``train(data="prefs.jsonl", cache="ref-cache", out="run1", max_steps=100)`` is the same as the CLI.
    Returns a summary: run dir, steps, final checkpoint path, the last logged train and eval metrics,
    seconds, and the checkpoint it resumed from (or None).
    """
    cfg = config or TrainConfig(**options)
    check_run_dir(cfg.out, cfg.resume)  # before the lock, so a refusal leaves nothing behind
    # One writer per run directory; ranks > 0 write nothing there.
    with directory_lock(cfg.out, "prefcache train", enabled=dist_info()[0] == 0):
        if cfg.loss[0] in UNPAIRED_LOSSES:  # KTO-style losses on unpaired data: their own loop
            return train_unpaired(cfg)
        return _train(cfg)


@dataclass
class PairData:
    """The pairs of a run and their reference values, checked before a model loads."""

    pairs: list  # TokenizedPair, training
    eval_pairs: list
    reference: ReferenceTable | None  # None: reference-free losses
    eval_reference: ReferenceTable | None
    examples: list  # the rendered texts of both splits, for pairs.parquet
    bad_rows: list
    max_length: int
    truncation: str

    @property
    def cache_meta(self) -> dict | None:
        return self.reference.metadata if self.reference else None


@dataclass
class PairModel:
    """The policy as the pair loop drives it."""

    module: torch.nn.Module  # LogProbModule, DDP-wrapped under torchrun
    params: list
    sharing: bool  # packed [prompt | chosen | rejected] rows
    aux_coef: float | None  # MoE: the model's own weight of its router load-balancing loss
    autocast: object
    pad_id: int
    loss_options: dict


def open_reference(cfg: TrainConfig, tokenizer, mapping: RowMapping):
    """(reference table or None, max_length, truncation): the cache's, checked against this tokenisation."""
    reference = ReferenceTable.from_cache(cfg.cache) if cfg.cache else None
    max_length = cfg.max_length or (reference.metadata["max_length"] if reference else 1024)
    truncation = cfg.truncation or (reference.metadata["truncation"] if reference else "keep_start")
    if reference:
        check_cache_matches(reference.metadata, tokenizer, max_length, truncation)
        check_cache_mapping(reference.metadata, mapping, cfg.cache)
    return reference, max_length, truncation


def load_pairs(cfg: TrainConfig, tokenizer, mapping: RowMapping, reference, max_length: int, truncation: str) -> PairData:
    """Training and held-out pairs, each cached (by id) with this run's token counts and finite values."""
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
    return PairData(pairs, eval_pairs, reference, eval_reference, examples + eval_examples, bad_rows, max_length,
                    truncation)


def build_model(run: RunState, data: PairData, cfg: TrainConfig) -> PairModel:
    """The kernel's module over the policy (DDP-wrapped under torchrun), and what every step passes it."""
    sharing = training_sharing(cfg.prefix_sharing, data.cache_meta, run.policy)
    module = LogProbModule(run.policy, chunk_size=cfg.chunk_size, router_aux=True)
    if run.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        module = DistributedDataParallel(module, device_ids=[run.device] if run.device.startswith("cuda") else None)
    loss_options = {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "simpo_gamma": cfg.simpo_gamma,
                    "discopop_tau": cfg.discopop_tau, "ld_alpha": cfg.ld_alpha, "f_divergence": cfg.f_divergence,
                    "f_alpha": cfg.f_alpha, "use_weighting": cfg.use_weighting}
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and run.device.startswith("cuda")
                else nullcontext())
    return PairModel(module, [p for p in run.policy.parameters() if p.requires_grad], sharing,
                     router_aux_coef(run.policy), autocast, run.tokenizer.pad_token_id, loss_options)


def _train(cfg: TrainConfig) -> dict:
    rank, world, device = setup(resolve_device(cfg.device))
    main = rank == 0
    out = Path(cfg.out)

    # 1. Tokenizer, reference cache and data: everything is checked before a model is loaded.
    source = resolve_model(cfg.model, cfg.revision)
    mapping = RowMapping.of(cfg)
    tokenizer = load_tokenizer(source)
    reference, max_length, truncation = open_reference(cfg, tokenizer, mapping)
    finetune, mismatch = resolve_finetune(cfg.finetune, reference.metadata if reference else None, device)
    if finetune != cfg.finetune:  # run.json and checkpoints record the policy actually trained
        cfg = replace(cfg, finetune=finetune)
    if mismatch and main:
        print(f"prefcache train: warning: {mismatch}", file=sys.stderr)
    data = load_pairs(cfg, tokenizer, mapping, reference, max_length, truncation)
    steps_per_epoch, total_steps = step_counts(cfg, len(data.pairs), world)

    # 2. The run directory: a fresh one, or a resume from its latest checkpoint.
    if (notice := check_run_dir(out, cfg.resume)) and main:
        print(f"prefcache train: {notice}", file=sys.stderr)
    ckpt, state, log = open_run(cfg, world=world, main=main, n_train=len(data.pairs))
    run = RunState(cfg, out, rank, world, device, steps_per_epoch, total_steps, len(data.pairs), max_length,
                   truncation, log, group_by_length=cfg.group_by_length, tokenizer=tokenizer)
    if main:
        write_pairs(out / "pairs.parquet", data.examples)
        if data.bad_rows:
            write_bad_rows(out / "bad_rows.jsonl", data.bad_rows)

    # 3. The policy (only it), its optimizer and schedule; DDP wraps the module whose forward runs.
    run.policy, run.policy_info = load_run_policy(cfg, source, ckpt, device)
    model = build_model(run, data, cfg)
    run.optimizer, run.scheduler, warmup = make_optimization(cfg, model.params, total_steps=total_steps, state=state)
    torch.manual_seed(cfg.seed + rank)  # dropout differs per rank, as in any data-parallel run
    run.restore(state)
    run_info = {"config": asdict(cfg), "prefcache_version": __version__, "world_size": world,
                "max_length": max_length, "truncation": truncation, "policy": run.policy_info,
                "cache": data.cache_meta,
                "eval_cache": data.eval_reference.metadata if data.eval_pairs and data.eval_reference else None,
                "train_pairs": len(data.pairs), "eval_pairs": len(data.eval_pairs), "bad_rows": len(data.bad_rows),
                "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "warmup_steps": warmup,
                "pairs_per_step": cfg.batch_size * cfg.grad_accum * world, "prefix_sharing": model.sharing,
                "resumed_from": str(ckpt) if ckpt else None,
                "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if main:
        write_run_info(out, run_info)
        write_config(cfg, out / "config.yaml")  # `prefcache train --config RUN/config.yaml` runs it again
    run.trackers = Trackers(cfg.report_to if main else (), out, run_info, state["step"] if state else None)
    run.start_clock()

    # 4. The loop: seeded epoch order -> a step of micro-batches -> log / eval / checkpoint.
    evaluate = (lambda at_step: run_eval(run, data, model, at_step)) if data.eval_pairs else None
    if evaluate and run.step == 0:
        evaluate(0)  # the baseline: at step 0 a fresh LoRA policy is the reference
    bar = tqdm(total=total_steps, initial=run.step, desc="train", unit="step", disable=not (main and cfg.progress),
               dynamic_ncols=True)
    order, order_epoch = None, None
    while run.step < total_steps:
        if order_epoch != (epoch := run.step // steps_per_epoch):  # a fresh seeded permutation each epoch
            lengths = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in data.pairs] \
                if cfg.group_by_length else None
            order = epoch_order(len(data.pairs), cfg.seed, epoch, rank, world, lengths, cfg.batch_size * cfg.grad_accum)
            order_epoch = epoch
        loss, local = train_step(run, data, model, order)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{local['rewards_accuracies']:.2f}",
                        margin=f"{local['rewards_margins']:.3f}", refresh=False)
        after_step(run, evaluate)
    bar.close()
    finish(run, evaluate)

    summary = {"run": str(out), "steps": run.step, "final_checkpoint": str(checkpoint_dir(out, run.step)),
               "train": {k: v for k, v in run.last_train.items() if k != "n"}, "eval": run.last_eval,
               "seconds": run.elapsed(), "resumed_from": str(ckpt) if ckpt else None,
               "step0_margin": run.step0_margin}
    if main:
        write_run_info(out, run_info | {"result": summary})
    barrier(world)
    return summary


def micro_step(run: RunState, data: PairData, model: PairModel, batch: list, share: float):
    """Forward and backward of one micro-batch; returns (loss result, loss inputs, policy values, aux loss).
    ``share``: the micro-batch's share of the step's pairs."""
    cfg = run.cfg
    ids = [p.id for p in batch]
    with model.autocast:
        pol = pair_logps(model.module, batch, pad_id=model.pad_id, device=run.device, chunk_size=cfg.chunk_size,
                         prefix_sharing=model.sharing, wpo=cfg.use_weighting)
    ref = {c: v.to(run.device) for c, v in data.reference.lookup(ids).items()} if data.reference else None
    inputs = loss_inputs(pol, ref)
    bco = {}
    if "bco_pair" in cfg.loss:  # bco_pair's reward shift: the running mean of all rewards seen so far
        rewards = cfg.beta * torch.cat([inputs.policy_chosen_logps - inputs.ref_chosen_logps,
                                        inputs.policy_rejected_logps - inputs.ref_rejected_logps])
        seen = torch.tensor([rewards.detach().sum().item(), rewards.numel()], dtype=torch.float64)
        if run.world > 1:
            seen = all_reduce_sum(seen.to(run.device), run.world)
        bco = {"bco_delta": run.bco.update(seen[0].item(), int(seen[1].item()))}
    result = combined_loss(cfg.loss, cfg.loss_weights, inputs, **model.loss_options, **bco)
    check_step(run.step + 1, ids, result.losses)  # before backward: NaN never reaches the weights
    # Each micro-batch's mean, weighted by its share of the step: the step's gradient is that of the mean
    # over all its pairs, whatever the split into micro-batches.
    loss = result.loss
    if (aux := getattr(model.module, "module", model.module).aux_loss) is not None:
        loss = loss + model.aux_coef * aux  # a mixture of experts also learns to balance its router
    (loss * share).backward()
    return result, inputs, pol, aux


def train_step(run: RunState, data: PairData, model: PairModel, order: list[int]) -> tuple[float, dict]:
    """One optimizer step over this rank's share of the step's pairs; returns (mean loss, local metrics)."""
    cfg, world = run.cfg, run.world
    span = cfg.batch_size * cfg.grad_accum
    position = run.step % run.steps_per_epoch
    step_idx = order[position * span : (position + 1) * span]
    micro = [step_idx[i : i + cfg.batch_size] for i in range(0, len(step_idx), cfg.batch_size)]
    t0 = time.perf_counter()
    loss_sum, tokens, positions, cols, aux_sum = 0.0, 0, 0, [], None
    for k, idx in enumerate(micro):
        batch = [data.pairs[i] for i in idx]
        # DDP all-reduces gradients on the last micro-batch of the step only.
        with model.module.no_sync() if world > 1 and k < len(micro) - 1 else nullcontext():
            result, inputs, pol, aux = micro_step(run, data, model, batch, len(batch) / len(step_idx))
        if aux is not None:
            aux_sum = (aux_sum or 0.0) + aux.item() * len(batch)
        loss_sum += result.loss.item() * len(batch)
        tokens += pol.n_tokens
        positions += pol.n_positions
        cols.append(example_cols(batch, inputs, result, cfg.beta, cfg.ld_alpha))

    grad_norm = torch.nn.utils.clip_grad_norm_(model.params, cfg.max_grad_norm or math.inf).item()
    check_step(run.step + 1, [data.pairs[i].id for i in step_idx], torch.zeros(0), grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    step_time = time.perf_counter() - t0

    cols = {k: [v for c in cols for v in c[k]] for k in cols[0]}
    local = aggregate(cols)
    if run.step == 1 and data.reference is not None and run.main:  # step 1's numbers are the step-0 policy's
        run.step0_margin = local["rewards_margins"]
        print(f"prefcache train: step 0 margin {run.step0_margin:.4g}, loss {loss_sum / len(step_idx):.4f} "
              f"(0 and ln 2 = 0.6931 when the policy starts as the cache's reference)"
              + ("; the policy is NOT the cache's reference" if abs(run.step0_margin) > STEP0_MARGIN_TOLERANCE
                 else ""), file=sys.stderr)
    if run.due(cfg.log_every):
        parts = gather((cols, loss_sum, tokens, peak_mem_mb(run.device), positions, aux_sum), world)
        if run.main:
            cols = {k: [v for c, *_ in parts for v in c[k]] for k in cols}
            run.last_train = aggregate(cols) | {"loss": sum(p[1] for p in parts) / len(cols["id"])}
            run.log.add_examples(cols, step=run.step, split="train")
            run.log.add_step(row := {**run.last_train, "step": run.step, "epoch": run.epoch(run.step),
                                     "split": "train", "lr": lr, "grad_norm": grad_norm,
                                     "tokens_per_s": sum(p[2] for p in parts) / step_time,
                                     "peak_mem_mb": max(p[3] for p in parts), "time_s": run.elapsed(),
                                     # the share of the computed token positions that were padding
                                     "padding_share": 1 - sum(p[2] for p in parts) / max(sum(p[4] for p in parts), 1),
                                     "aux_loss": None if aux_sum is None else sum(p[5] for p in parts) / len(cols["id"])})
            run.trackers.log(row, step=run.step, split="train")
    return loss_sum / len(step_idx), local


def run_eval(run: RunState, data: PairData, model: PairModel, at_step: int) -> None:
    """Score the held-out pairs (each rank its share), logged by rank 0 as the eval split of ``at_step``."""
    cfg = run.cfg
    bco = {"bco_delta": run.bco.value} if "bco_pair" in cfg.loss else {}
    cols, losses = evaluate_split(run.policy, data.eval_pairs[run.rank :: run.world], data.eval_reference, cfg,
                                  pad_id=model.pad_id, device=run.device, loss_options={**model.loss_options, **bco},
                                  prefix_sharing=model.sharing)
    parts = gather((cols, losses), run.world)
    if run.main:
        cols = {k: [v for c, _ in parts for v in c[k]] for k in cols}
        run.last_eval = aggregate(cols) | {"loss": sum(s for _, s in parts) / len(cols["id"])}
        run.log.add_examples(cols, step=at_step, split="eval")
        run.log.add_step(row := {**run.last_eval, "step": at_step, "epoch": run.epoch(at_step), "split": "eval",
                                 "time_s": run.elapsed(), "peak_mem_mb": peak_mem_mb(run.device)})
        run.trackers.log(row, step=at_step, split="eval")
    run.last_eval_step = at_step


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
    else:
        rc = rr = None
        wc, wr = result.chosen_rewards.detach().cpu().double(), result.rejected_rewards.detach().cpu().double()
    return example_columns(batch, pc, pr, rc, rr, wc, wr)


def evaluate_split(policy, pairs, reference, cfg: TrainConfig, *, pad_id, device, loss_options,
                   prefix_sharing: bool = False) -> tuple[dict, float]:
    """Per-example columns and the summed loss of held-out pairs, no gradients.

    With a reference the columns come from ``scoring.score_pairs``, the code path of ``prefcache score``,
    so its numbers for a checkpoint are the run's eval numbers. The loss needs a policy pass of its own
    only when score's columns cannot give it (reference-free, or ld_alpha's prefix sums).
    """
    if not pairs:  # a rank whose share of a tiny eval set is empty
        return {c: [] for c in EXAMPLE_COLUMNS}, 0.0
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

