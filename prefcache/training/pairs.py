"""Preference pairs as a kind of example for the one training loop (see :mod:`prefcache.training.task`).

Reference values come from a cache of pairs, joined by example id after checking that the cache was
made with this run's tokenisation, holds every id with this run's token counts, once, and with finite
values. Policy log-probs come from the kernel that made the cache (``prefcache.model.pairs.pair_logps``),
so a fresh LoRA policy on the reference model starts with rewards of 0 and a sigmoid loss of ln 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prefcache.cache.compat import check_cache_mapping, check_cache_matches
from prefcache.cache.lookup import ReferenceTable, check_joined, check_reference_values
from prefcache.core.distributed import all_reduce_sum
from prefcache.core.schemas import EXAMPLE_COLUMNS, example_columns
from prefcache.data.columns import RowMapping
from prefcache.data.store import example_images, pair_rows, text_batches
from prefcache.data.vision_pairs import TokenizedVisionPair
from prefcache.losses import LossInputs, ld_logps
from prefcache.losses.combine import Objective
from prefcache.model.pairs import PairLogps, pair_logps
from prefcache.training.log import write_example_images, write_pairs_batches
from prefcache.training.scoring import aggregate, score_pairs
from prefcache.training.state import split_held_out, store_options
from prefcache.training.task import Forward, PolicyModel, TaskData, Totals


def bind_objective(cfg) -> Objective:
    """The run's pair objective, names, weights and options checked once."""
    return Objective.bind(cfg.loss, cfg.loss_weights, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                          simpo_gamma=cfg.simpo_gamma, discopop_tau=cfg.discopop_tau, ld_alpha=cfg.ld_alpha,
                          f_divergence=cfg.f_divergence, f_alpha=cfg.f_alpha, use_weighting=cfg.use_weighting)


def open_reference(cfg, tokenizer, mapping: RowMapping, processor=None):
    """(reference table or None, max_length, truncation): the cache's, checked against this tokenisation (and a
    vision-language model's processor)."""
    reference = ReferenceTable.from_cache(cfg.cache) if cfg.cache else None
    max_length = cfg.max_length or (reference.metadata["max_length"] if reference else 1024)
    truncation = cfg.truncation or (reference.metadata["truncation"] if reference else "keep_start")
    if reference:
        check_cache_matches(reference.metadata, tokenizer, max_length, truncation, processor)
        check_cache_mapping(reference.metadata, mapping, cfg.cache)
    return reference, max_length, truncation


@dataclass(frozen=True)
class PairTask(TaskData):
    """The pairs of a run (``TokenizedPair`` rows) and their reference values (None: reference-free losses),
    checked before a model loads, and the objective bound to the run's options."""

    reference: ReferenceTable | None
    eval_reference: ReferenceTable | None
    objective: Objective
    unit = "pair"

    @staticmethod
    def refuse(cfg) -> None:
        """Refusals that need neither data nor model (none beyond TrainConfig's own)."""

    @classmethod
    def load(cls, cfg, tokenizer, processor=None) -> PairTask:
        """Training and held-out pairs, each cached (by id) with this run's token counts and finite values.
        ``processor``: a vision-language model's (its pairs hold their images' references), None for text."""
        objective = bind_objective(cfg)  # before any data is read: a bad option costs nothing
        mapping = RowMapping.of(cfg)
        reference, max_length, truncation = open_reference(cfg, tokenizer, mapping, processor)
        data = {"data_config": cfg.data_config, "mapping": mapping, "processor": processor,
                **store_options(cfg, tokenizer, processor)}
        pairs, bad_rows = pair_rows(cfg.data, tokenizer, max_length, truncation, cfg.on_bad_row, split=cfg.split,
                                    **data)
        eval_pairs, eval_reference, texts = [], reference, [pairs]
        if cfg.eval_data:
            eval_reference = ReferenceTable.from_cache(cfg.eval_cache) if cfg.eval_cache else reference
            if eval_reference is not reference:
                check_cache_matches(eval_reference.metadata, tokenizer, max_length, truncation, processor)
                check_cache_mapping(eval_reference.metadata, mapping, cfg.eval_cache)
            eval_pairs, _ = pair_rows(cfg.eval_data, tokenizer, max_length, truncation, cfg.on_bad_row,
                                      split=cfg.eval_split, **data)
            texts.append(eval_pairs)
        elif cfg.eval_fraction:
            pairs, eval_pairs = split_held_out(pairs, cfg.eval_fraction)
        for ref, split, what in ((reference, pairs, "training"), (eval_reference, eval_pairs, "eval")):
            if ref and split:
                check_joined(ref, split, what)
                check_reference_values(ref, split, what)
        if not pairs:
            raise ValueError(f"no training pairs in {cfg.data}")
        return cls(cfg=cfg, train_set=pairs, eval_set=eval_pairs, texts=texts, bad_rows=bad_rows,
                   max_length=max_length, truncation=truncation, reference=reference, eval_reference=eval_reference,
                   objective=objective)

    @property
    def cache_meta(self) -> dict | None:
        return self.reference.metadata if self.reference else None

    def info(self) -> dict:
        """This kind's entries of run.json."""
        return {"cache": self.cache_meta, "train_pairs": len(self.train_set), "eval_pairs": len(self.eval_set),
                "eval_cache": self.eval_reference.metadata if self.eval_set and self.eval_reference else None}

    def lengths(self):
        """Tokens of each training pair (prompt, chosen and rejected), for length-grouped batches."""
        return self.train_set.lengths()

    def write_texts(self, path) -> None:
        """``pairs.parquet`` at ``path``; a vision run's image references beside its examples logs too."""
        write_pairs_batches(path, text_batches(self.texts))
        if self.train_set.make is TokenizedVisionPair:
            write_example_images(Path(path).parent / "logs", example_images(self.texts), "train")

    def metrics(self, columns: dict[str, list]) -> dict:
        return aggregate(columns)

    def step0_margin(self, metrics: dict) -> float | None:
        """The first step's margin, measured on the starting policy (0 when it is the cache's reference)."""
        return metrics["rewards_margins"] if self.reference is not None else None

    def forward(self, model: PolicyModel, batch: list, run) -> Forward:
        """Policy log-probs of one micro-batch (with gradients), joined to the cache's by id, and the loss."""
        cfg = self.cfg
        with model.autocast():
            pol = pair_logps(model.module, batch, pad_id=model.pad_id, device=model.device, chunk_size=model.chunk_size,
                             prefix_sharing=model.sharing, wpo=cfg.use_weighting, vision=model.vision(batch))
        ref = self.reference.lookup([p.id for p in batch]) if self.reference else None
        inputs = loss_inputs(pol, None if ref is None else {c: v.to(model.device) for c, v in ref.items()})
        bco = {}
        if "bco_pair" in cfg.loss:  # bco_pair's reward shift: the running mean of all rewards seen so far
            rewards = cfg.beta * torch.cat([inputs.policy_chosen_logps - inputs.ref_chosen_logps,
                                            inputs.policy_rejected_logps - inputs.ref_rejected_logps])
            seen = torch.tensor([rewards.detach().sum().item(), rewards.numel()], dtype=torch.float64)
            if run.world > 1:
                seen = all_reduce_sum(seen.to(model.device), run.world)
            bco = {"bco_delta": run.bco.update(seen[0].item(), int(seen[1].item()))}
        result = self.objective(inputs, **bco)
        return Forward(result.loss, result.losses, example_cols(batch, inputs, result, cfg.beta, cfg.ld_alpha),
                       pol.n_tokens, pol.n_positions)

    def eval_share(self, rank: int, world: int) -> list:
        """Each rank scores every world_size-th held-out pair."""
        return self.eval_set[rank::world]

    def evaluate(self, model: PolicyModel, pairs: list, run) -> Totals:
        """Per-example columns and the summed loss of held-out pairs, no gradients.

        With a reference the columns come from ``scoring.score_pairs``, the code path of ``prefcache score``,
        so its numbers for a checkpoint are the run's eval numbers. The loss needs a policy pass of its own
        only when score's columns cannot give it (reference-free, or ld_alpha's prefix sums, or WPO).
        """
        if not pairs:  # a rank whose share of a tiny eval set is empty
            return Totals({c: [] for c in EXAMPLE_COLUMNS}, peak_mem_mb=0.0)
        # Through the kernel's module, as the steps run: under --fsdp its hooks gather the sharded weights.
        cfg, reference, policy = self.cfg, self.eval_reference, model.plain
        batch_size = cfg.eval_batch_size or cfg.batch_size
        cols = None
        if reference is not None:
            cols, _ = score_pairs(policy, pairs, reference, beta=cfg.beta, batch_size=batch_size, pad_id=model.pad_id,
                                  device=model.device, chunk_size=cfg.chunk_size, prefix_sharing=model.sharing,
                                  processor=model.processor)
        if cols is not None and cfg.ld_alpha is None and not cfg.use_weighting:
            t = {k: torch.tensor(cols[k], dtype=torch.float64) for k in cols if k != "id"}
            inputs = LossInputs(t["policy_chosen_logps"], t["policy_rejected_logps"], t["ref_chosen_logps"],
                                t["ref_rejected_logps"], t["chosen_tokens"], t["rejected_tokens"])
        else:
            inputs = loss_inputs(_no_grad_logps(policy, pairs, model, batch_size, cfg.use_weighting),
                                 reference.lookup([p.id for p in pairs]) if reference else None)
        result = self.objective(inputs, **({"bco_delta": run.bco.value} if "bco_pair" in cfg.loss else {}))
        if cols is None:
            cols = example_cols(pairs, inputs, result, cfg.beta, cfg.ld_alpha)
        return Totals(cols, float(result.losses.sum()), len(pairs))


def _no_grad_logps(policy, pairs, model: PolicyModel, batch_size: int, wpo: bool) -> PairLogps:
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        batches = [list(pairs[s : s + batch_size]) for s in range(0, len(pairs), batch_size)]
        parts = [pair_logps(policy, b, pad_id=model.pad_id, device=model.device, chunk_size=model.chunk_size,
                            prefix_sharing=model.sharing, wpo=wpo, vision=model.vision(b)) for b in batches]
    policy.train(was_training)
    cat = lambda f: torch.cat([getattr(p, f) for p in parts]).cpu()  # noqa: E731
    return PairLogps(*(cat(f) for f in ("chosen", "rejected", "chosen_prefix", "rejected_prefix", "chosen_tokens",
                                        "rejected_tokens")), sum(p.n_tokens for p in parts),
                     **({f: cat(f) for f in ("chosen_wpo", "rejected_wpo")} if wpo else {}))


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
