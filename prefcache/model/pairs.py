"""prefcache.model.pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefcache.model.kernel import DEFAULT_CHUNK, LogProbModule, collate, pair_sums, token_logprobs
from prefcache.model.packing import pack, packed_token_logprobs, resolve_sharing


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

    ``model`` may be a causal LM or a (DDP-wrapped) :class:`~prefcache.model.kernel.LogProbModule`.
    ``prefix_sharing``: one packed row ``[prompt | chosen | rejected]`` per pair (``prefcache.model.packing``), the
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
