"""Policy log-probs of tokenised pairs, cached reference values joined by id, implicit rewards.

One code path for the trainer (its steps and its eval split) and for ``prefcache score``: the numbers
a run logs for held-out pairs and the numbers ``score`` reports for a checkpoint come from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pyarrow as pa
import torch

from .cache import TOKENIZATION_KEYS, CacheError, differences, read_cache, read_metadata
from .logprobs import DEFAULT_CHUNK, LogProbModule, collate, pair_sums, token_logprobs
from .models import chat_template_hash, tokenizer_fingerprint
from .packing import pack, packed_token_logprobs, resolve_sharing
from .schemas import CACHE, EXAMPLE_COLUMNS, example_columns


@dataclass
class PairLogps:
    """Summed completion log-probs (nats) of a batch of pairs; tensors are [B]."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_prefix: torch.Tensor  # over the first min(chosen_tokens, rejected_tokens) tokens (LD-DPO)
    rejected_prefix: torch.Tensor
    chosen_tokens: torch.Tensor  # completion token counts, float
    rejected_tokens: torch.Tensor
    n_tokens: int  # real (non-pad) tokens processed, prompt included: for tokens/s
    n_positions: int = 0  # token positions in the batch's tensors, padding included: padding share
    chosen_wpo: torch.Tensor | None = None  # WPO: mean over completion of log p(y_t) - log Σ_v p(v)², detached
    rejected_wpo: torch.Tensor | None = None


def pair_tensors(pairs, pad_id: int):
    """[2B, T] input_ids, attention_mask, completion_mask: rows 0..B-1 chosen, B..2B-1 rejected."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    return collate(seqs, starts, pad_id)


def pair_logps(model, pairs, *, pad_id: int, device="cpu", chunk_size: int = DEFAULT_CHUNK,
               prefix_sharing: bool = False, wpo: bool = False) -> PairLogps:
    """Policy log-probs of ``pairs`` through the shared kernel; gradients follow ``torch.is_grad_enabled()``.

    ``model`` may be a causal LM or a (DDP-wrapped) :class:`~prefcache.logprobs.LogProbModule`.
    ``prefix_sharing``: one packed row ``[prompt | chosen | rejected]`` per pair (``prefcache.packing``), the
    prompt computed once; the same numbers as two sequences per pair, to float rounding. A model that cannot
    take the block mask falls back to two sequences (said once).
    ``wpo``: also the per-sequence values WPO's weights are made of (``losses.wpo_weights``).
    """
    module = model if isinstance(getattr(model, "module", model), LogProbModule) else None
    lm = getattr(model, "module", model).model if module is not None else model
    b = len(pairs)
    if resolve_sharing(lm, prefix_sharing):
        packed = pack([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], pad_id).to(device)
        token = packed_token_logprobs(lm, packed, chunk_size=chunk_size, module=module, with_sq=wpo)  # [B, T]
        token, sq = token if wpo else (token, None)
        sides = [(token, packed.segments == 1), (token, packed.segments == 2)]
        sq_sides = [sq, sq]
        n_tokens, n_positions = packed.n_tokens, packed.input_ids.numel()
    else:
        input_ids, attention, completion = (t.to(device) for t in pair_tensors(pairs, pad_id))
        if module is not None:
            token = module(input_ids, attention, completion, with_sq=wpo)
        else:
            token = token_logprobs(model, input_ids, attention, completion, chunk_size=chunk_size, with_sq=wpo)  # [2B, T]
        token, sq = token if wpo else (token, None)
        completion = completion.bool() & attention.bool()
        sides = [(token[:b], completion[:b]), (token[b:], completion[b:])]
        sq_sides = [None, None] if sq is None else [sq[:b], sq[b:]]
        n_tokens, n_positions = int(attention.sum()), attention.numel()
    totals, prefixes, counts = pair_sums(*sides)  # the cache's own reduction (reference.shard_columns)
    out = PairLogps(totals[0], totals[1], prefixes[0], prefixes[1], counts[0].float(), counts[1].float(), n_tokens,
                    n_positions)
    if wpo:  # TRL 1.16's WPO: mean over the completion of (log p - log Σ p²), no gradient
        out.chosen_wpo, out.rejected_wpo = (((tok.detach() - sq) * mask).sum(-1) / n.float().clamp(min=1.0)
                                            for (tok, mask), sq, n in zip(sides, sq_sides, counts, strict=True))
    return out


class ReferenceTable:
    """Cached reference values keyed by example id (never by row order)."""

    # the cache's numeric columns: log-probs and token counts (not the truncation flags)
    COLUMNS = tuple(f.name for f in CACHE if pa.types.is_floating(f.type) or pa.types.is_integer(f.type))

    def __init__(self, table, metadata: dict, path: str):
        self.metadata = metadata
        self.path = path
        self.index = {ident: i for i, ident in enumerate(table.column("id").to_pylist())}
        self.values = {c: torch.tensor(table.column(c).to_numpy(), dtype=torch.float64) for c in self.COLUMNS}

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike) -> ReferenceTable:
        meta = read_metadata(cache_dir)
        if meta.get("kind") == "unpaired":
            raise CacheError(f"{cache_dir} is an unpaired (KTO) cache: pair losses need a cache of pairs "
                             "(prefcache precompute without --unpaired); kto and apo_zero_unpaired use this one")
        return cls(read_cache(cache_dir, columns=["id", *cls.COLUMNS]), meta, str(cache_dir))

    def missing(self, ids) -> list[str]:
        return [i for i in ids if i not in self.index]

    def require(self, ids) -> None:
        """Raise CacheError naming how many ids, and which, the cache lacks."""
        if missing := self.missing(ids):
            raise CacheError(
                f"{len(missing)} of {len(ids)} example ids are not in the cache {self.path}, e.g. "
                + ", ".join(missing[:5]) + ". Run `prefcache precompute` on this data with the same --out to add them."
            )

    def lookup(self, ids) -> dict[str, torch.Tensor]:
        """Column -> [B] float64 tensor, in the order of ``ids``."""
        self.require(ids)
        rows = torch.tensor([self.index[i] for i in ids], dtype=torch.long)
        return {c: v[rows] for c, v in self.values.items()}


def cache_sharing(meta: dict) -> bool:
    """Whether a cache's values came from packed rows (caches made before prefix sharing: no)."""
    return bool(meta.get("prefix_sharing", False))


def check_cache_matches(meta: dict, tokenizer, max_length: int, truncation: str) -> None:
    """Refuse a cache whose tokenisation is not the one about to be used, saying what differs."""
    want = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "chat_template_hash": chat_template_hash(tokenizer),
            "max_length": max_length, "truncation": truncation}
    if diff := differences(meta, want, TOKENIZATION_KEYS):
        raise CacheError("the reference cache does not match this model's tokenisation:\n  " + "\n  ".join(diff))


def score_pairs(model, pairs, reference: ReferenceTable, *, beta: float, batch_size: int, pad_id: int,
                device="cpu", chunk_size: int = DEFAULT_CHUNK,
                prefix_sharing: bool | None = None) -> tuple[dict[str, list], dict[str, float]]:
    """Implicit rewards of ``pairs`` under ``model`` against the cached reference.

    ``prefix_sharing``: score pairs as packed rows (None: as the cache was made, see :func:`cache_sharing`).

    reward = beta * (policy_logps - ref_logps) per side (summed log-probs, nats);
    margin = reward_chosen - reward_rejected; accuracy = share of pairs with margin > 0 (ties count as wrong).
    Returns (per-example columns in the run's ``examples`` schema, without step/split/checkpoint;
    aggregate means: rewards_chosen, rewards_rejected, rewards_margins, rewards_accuracies,
    logps_chosen, logps_rejected, n).
    """
    cols: dict[str, list] = {k: [] for k in EXAMPLE_COLUMNS}
    if prefix_sharing is None:
        prefix_sharing = cache_sharing(reference.metadata)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            batch = pairs[s : s + batch_size]
            ids = [p.id for p in batch]
            ref = reference.lookup(ids)
            pol = pair_logps(model, batch, pad_id=pad_id, device=device, chunk_size=chunk_size,
                             prefix_sharing=prefix_sharing)
            pc, pr = pol.chosen.double().cpu(), pol.rejected.double().cpu()
            rc, rr = beta * (pc - ref["chosen_logps"]), beta * (pr - ref["rejected_logps"])
            for k, v in example_columns(batch, pc, pr, ref["chosen_logps"], ref["rejected_logps"], rc, rr).items():
                cols[k] += v
    model.train(was_training)
    return cols, aggregate(cols)


def aggregate(cols: dict[str, list]) -> dict[str, float]:
    """Means over pairs, named like the trainer's step metrics."""
    n = len(cols["id"])
    if n == 0:
        return {"n": 0}
    mean = lambda xs: float(sum(xs) / n)  # noqa: E731
    return {
        "rewards_chosen": mean(cols["reward_chosen"]),
        "rewards_rejected": mean(cols["reward_rejected"]),
        "rewards_margins": mean(cols["margin"]),
        "rewards_accuracies": mean([float(m > 0) for m in cols["margin"]]),
        "logps_chosen": mean(cols["policy_chosen_logps"]),
        "logps_rejected": mean(cols["policy_rejected_logps"]),
        "n": n,
    }


def check_joined(reference: ReferenceTable, pairs, what: str) -> None:
    """Every id must be cached, and with the token counts this run's tokenisation gives (with an id
    column, other content under a cached id would otherwise be joined to the wrong reference values)."""
    ids = [p.id for p in pairs]
    reference.require(ids)  # CacheError: how many ids are missing, and which
    ref = reference.lookup(ids)
    wrong = [p.id for i, p in enumerate(pairs)
             if (len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids))
             != tuple(int(ref[c][i]) for c in ("prompt_tokens", "chosen_tokens", "rejected_tokens"))]
    if wrong:
        raise CacheError(f"{len(wrong)} of the {what} pairs have other token counts than the cache {reference.path} "
                         f"records, e.g. {', '.join(wrong[:5])}: their content changed since the cache was made. "
                         "Re-run `prefcache precompute` on this data into a new cache.")
