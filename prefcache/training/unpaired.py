"""Unpaired examples (TRL's KTO format) as a kind of example for the one training loop, with the losses
``kto`` and ``apo_zero_unpaired`` (:mod:`prefcache.losses.unpaired`, after TRL 1.16's ``KTOTrainer``).

Each example has a completion and a label (True = desirable) and, for kto, a KL completion: the
completion of the example the cache names (``kl_id``) after its own prompt, whose policy log-prob minus the
cached reference one estimates KTO's reference point z = max(0, mean over the micro-batch), without
gradient; under torchrun the per-rank means are averaged before the clamp, as TRL gathers them. With
prefix sharing an example is one packed row ``[prompt | completion | KL completion]``, the prompt computed
once (a KL completion whose prompt keep_end truncation cut differently gets a row of its own). At step 0
(policy = reference) Δ = 0 and z = 0, so every kto loss is 0.5 at unit weights.

Held-out examples are scored on rank 0 alone, in ``eval_batch_size`` batches, so their KL batches are
those of one process. Logged: rewards_chosen = mean β Δ over desirable examples, rewards_rejected over
undesirable ones, their difference as rewards_margins (TRL's rewards/margins), logps likewise, and kl (z);
no accuracies. Column mappings and templates are refused (not supported for unpaired data yet).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from prefcache.cache.compat import check_cache_matches
from prefcache.cache.lookup import UnpairedReference, check_joined, check_reference_values
from prefcache.core.distributed import all_reduce_sum, dist_info
from prefcache.data.rows import IdIndex
from prefcache.data.store import text_batches, unpaired_rows
from prefcache.data.unpaired import check_no_mapping, kl_sequence
from prefcache.losses.unpaired import UnpairedObjective, kl_estimate
from prefcache.model.pairs import unpaired_logps
from prefcache.training.log import write_pairs_batches
from prefcache.training.state import split_held_out, store_options
from prefcache.training.task import Forward, PolicyModel, TaskData, Totals


@dataclass(frozen=True)
class UnpairedTask(TaskData):
    """The examples of an unpaired run (``TokenizedCompletion`` rows), checked against their caches before a
    model loads."""

    reference: UnpairedReference
    eval_reference: UnpairedReference
    by_id: IdIndex  # id -> TokenizedCompletion of both splits: KL partners may sit in either
    objective: UnpairedObjective
    unit = "example"

    @staticmethod
    def refuse(cfg) -> None:
        """Refusals that need neither data nor model."""
        if cfg.cache is None:
            raise ValueError(f"--loss {cfg.loss[0]} needs an unpaired reference cache (prefcache precompute --unpaired)")
        check_no_mapping(cfg)
        if UnpairedObjective(cfg.loss[0]).needs_kl and cfg.batch_size < 2:
            # TRL refuses it too: z would be the example's own reward
            raise ValueError("kto estimates its KL term over the micro-batch: --batch-size must be at least 2")

    @classmethod
    def load(cls, cfg, tokenizer, processor=None) -> UnpairedTask:
        """Training and held-out examples, each cached once with its token counts, finite values and a KL partner.
        ``processor``: always None (a vision-language model's unpaired run is refused before: training.vision)."""
        objective = UnpairedObjective(cfg.loss[0], cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        reference = UnpairedReference.from_cache(cfg.cache)
        max_length = cfg.max_length or reference.metadata["max_length"]
        truncation = cfg.truncation or reference.metadata["truncation"]
        check_cache_matches(reference.metadata, tokenizer, max_length, truncation)
        common = (tokenizer, max_length, truncation, cfg.on_bad_row)
        store = {"data_config": cfg.data_config, **store_options(cfg, tokenizer)}
        items, bad_rows = unpaired_rows(cfg.data, *common, split=cfg.split, **store)
        eval_items, eval_reference, texts = [], reference, [items]
        if cfg.eval_data:
            eval_reference = UnpairedReference.from_cache(cfg.eval_cache) if cfg.eval_cache else reference
            if eval_reference is not reference:
                check_cache_matches(eval_reference.metadata, tokenizer, max_length, truncation)
            eval_items, _ = unpaired_rows(cfg.eval_data, *common, split=cfg.eval_split, **store)
            texts.append(eval_items)
        elif cfg.eval_fraction:
            items, eval_items = split_held_out(items, cfg.eval_fraction)
        if not items:
            raise ValueError(f"no training examples in {cfg.data}")
        labels = set(items.column("label").tolist())
        if len(labels) == 1 and dist_info()[0] == 0:  # legal, but the logs would say nothing
            desirable = labels.pop()
            has, lacks = ("desirable", "undesirable") if desirable else ("undesirable", "desirable")
            print(f"prefcache train: warning: the training examples are all {has} (no {lacks} ones): that side "
                  f"is empty, so rewards_{'rejected' if desirable else 'chosen'} and rewards_margins stay "
                  f"null and {cfg.loss[0]} learns from one side only", file=sys.stderr)
        for ref, split, what in ((reference, items, "training"), (eval_reference, eval_items, "eval")):
            if split:
                check_joined(ref, split, what)
                check_reference_values(ref, split, what)  # a NaN reference value would train NaN weights
        by_id = IdIndex([items, *([eval_items] if eval_items else [])])
        partners = [r.partner(i) for r, its in ((reference, items), (eval_reference, eval_items))
                    for i in (its.ids() if its else [])]
        if missing := sorted(set(by_id.missing(partners))):
            raise ValueError(f"{len(missing)} KL completions come from examples not in the data, e.g. {missing[:3]}")
        return cls(cfg=cfg, train_set=items, eval_set=eval_items, texts=texts, bad_rows=bad_rows,
                   max_length=max_length, truncation=truncation, reference=reference, eval_reference=eval_reference,
                   by_id=by_id, objective=objective)

    @property
    def cache_meta(self) -> dict:
        return self.reference.metadata

    def info(self) -> dict:
        return {"cache": self.cache_meta, "train_pairs": len(self.train_set), "train_examples": len(self.train_set),
                "eval_examples": len(self.eval_set)}

    def lengths(self):
        """Tokens of each training example (its prompt and completion), for length-grouped batches."""
        return self.train_set.lengths()

    def write_texts(self, path) -> None:
        """RUN/pairs.parquet: a desirable completion as chosen, an undesirable one as rejected."""
        write_pairs_batches(path, text_batches(self.texts))

    def metrics(self, cols: dict[str, list]) -> dict:
        """Step metrics: desirable examples fill the chosen slots, undesirable ones the rejected slots."""
        def mean(name):
            values = [v for v in cols[name] if v is not None]
            return sum(values) / len(values) if values else None

        rc, rr = mean("reward_chosen"), mean("reward_rejected")
        return {"rewards_chosen": rc, "rewards_rejected": rr,
                "rewards_margins": rc - rr if rc is not None and rr is not None else None, "rewards_accuracies": None,
                "logps_chosen": mean("policy_chosen_logps"), "logps_rejected": mean("policy_rejected_logps"),
                "n": len(cols["id"])}

    def step0_margin(self, metrics: dict) -> float | None:
        return None

    def forward(self, model: PolicyModel, batch: list, run, *, train: bool = True) -> Forward:
        """Loss, per-example columns and KL estimate of a micro-batch; ``train``: the gradient-carrying pass
        (the KL means of all ranks averaged), else a held-out batch on one process."""
        ids = [i.id for i in batch]
        reference = self.reference if train else self.eval_reference
        kl_seqs = None
        if self.objective.needs_kl:
            kl_seqs = [kl_sequence(i, self.by_id[reference.partner(i.id)], self.max_length, self.truncation)
                       for i in batch]
        with model.autocast():
            pol = unpaired_logps(model.module if train else model.plain, batch, kl_seqs, pad_id=model.pad_id,
                                 device=model.device, chunk_size=model.chunk_size, prefix_sharing=model.sharing,
                                 kl_model=model.plain)
        ref = reference.lookup(ids)
        kl = torch.zeros((), dtype=torch.float64)
        if kl_seqs is not None:
            world = run.world if train else 1
            reduce = (lambda v: all_reduce_sum(v, world) / world) if world > 1 else None  # TRL gathers the means
            kl = kl_estimate(pol.kl.double(), ref["kl_logps"].to(model.device), reduce).cpu()
        labels = torch.tensor([i.label for i in batch], device=model.device)
        out = self.objective(pol.completion.double(), ref["logps"].to(model.device), labels, kl.to(model.device))
        return Forward(out.losses.mean(), out.losses, _columns(batch, pol.completion, ref["logps"], out.rewards),
                       pol.n_tokens, pol.n_positions, float(kl))

    def eval_share(self, rank: int, world: int) -> list:
        """Rank 0 scores every held-out example (its KL batches are then those of one process)."""
        return self.eval_set if rank == 0 else []

    def evaluate(self, model: PolicyModel, items: list, run) -> Totals:
        totals = Totals()
        batch_size = self.cfg.eval_batch_size or self.cfg.batch_size
        was_training = model.policy.training
        model.policy.eval()
        with torch.no_grad():
            for s in range(0, len(items), batch_size):
                chunk = list(items[s : s + batch_size])  # a data store's view: the batch built once
                totals.add(self.forward(model, chunk, run, train=False), len(chunk))
        model.policy.train(was_training)
        return totals


def _columns(items, policy: torch.Tensor, ref: torch.Tensor, rewards: torch.Tensor) -> dict[str, list]:
    """Per-example log columns: a desirable example's values in the chosen columns, an undesirable one's in
    the rejected columns (the other side null), no margin."""
    pol, ref, rewards = policy.detach().double().cpu().tolist(), ref.tolist(), rewards.cpu().tolist()
    side = lambda values, want: [v if i.label == want else None for v, i in zip(values, items, strict=True)]  # noqa: E731
    ntok = [len(i.completion_ids) for i in items]
    return {"id": [i.id for i in items], "label": [i.label for i in items],
            "policy_chosen_logps": side(pol, True), "policy_rejected_logps": side(pol, False),
            "ref_chosen_logps": side(ref, True), "ref_rejected_logps": side(ref, False),
            "reward_chosen": side(rewards, True), "reward_rejected": side(rewards, False), "margin": [None] * len(items),
            "prompt_tokens": [len(i.prompt_ids) for i in items], "chosen_tokens": side(ntok, True),
            "rejected_tokens": side(ntok, False)}
