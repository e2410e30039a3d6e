"""Policy log-probs of a batch of examples through the shared kernel: a pair's two completions
(:func:`pair_logps`) or an unpaired example's completion and its KL completion (:func:`unpaired_logps`),
as two sequences or as one packed row that computes the prompt once (:mod:`prefcache.model.packing`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefcache.model.kernel import DEFAULT_CHUNK, LogProbModule, collate, pair_sums, token_logprobs
from prefcache.model.packing import pack, packed_token_logprobs, resolve_sharing
from prefcache.model.vision import repeat_vision


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
               prefix_sharing: bool = False, wpo: bool = False, vision: dict | None = None) -> PairLogps:
    """Policy log-probs of ``pairs`` through the shared kernel; gradients follow ``torch.is_grad_enabled()``.

    ``model`` may be a causal LM or a (DDP-wrapped) :class:`~prefcache.model.kernel.LogProbModule`.
    ``prefix_sharing``: one packed row ``[prompt | chosen | rejected]`` per pair (``prefcache.model.packing``), the
    prompt computed once; the same numbers as two sequences per pair, to float rounding. A model that cannot
    take the block mask falls back to two sequences (said once).
    ``wpo``: also the per-sequence values WPO's weights are made of (``losses.wpo_weights``).
    ``vision``: a vision-language model's image tensors of the B prompts, in order, as its processor returns them
    (``prompt_ids`` then hold the image tokens); a packed row encodes its images once, two sequences twice.
    """
    module = model if isinstance(getattr(model, "module", model), LogProbModule) else None
    lm = getattr(model, "module", model).model if module is not None else model
    b = len(pairs)
    if vision is not None:
        vision = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vision.items()}
    if resolve_sharing(lm, prefix_sharing):
        packed = pack([(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs], pad_id).to(device)
        token = packed_token_logprobs(lm, packed, chunk_size=chunk_size, module=module, with_sq=wpo,
                                      vision=vision)  # [B, T]
        token, sq = token if wpo else (token, None)
        sides = [(token, packed.segments == 1), (token, packed.segments == 2)]
        sq_sides = [sq, sq]
        n_tokens, n_positions = packed.n_tokens, packed.input_ids.numel()
    else:
        input_ids, attention, completion = (t.to(device) for t in pair_tensors(pairs, pad_id))
        both = repeat_vision(vision, 2)  # the rows are [chosen..., rejected...]
        if module is not None:
            token = module(input_ids, attention, completion, with_sq=wpo, vision=both)
        else:
            token = token_logprobs(model, input_ids, attention, completion, chunk_size=chunk_size, with_sq=wpo,
                                   vision=both)  # [2B, T]
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


@dataclass
class UnpairedLogps:
    """Summed completion log-probs (nats, fp32) of unpaired examples [B]; ``kl`` has no gradient (TRL: the
    KL reference point is a constant of the loss), None when not asked for."""

    completion: torch.Tensor
    kl: torch.Tensor | None
    n_tokens: int  # real tokens computed, prompts included
    n_positions: int  # positions in the batch's tensors, padding included


def _sequence_sums(model, seqs, *, pad_id: int, device, chunk_size: int) -> tuple[torch.Tensor, int, int]:
    """([N] summed completion log-probs, real tokens, positions) of (prompt ids, completion ids) sequences."""
    input_ids, attention, completion = (t.to(device) for t in collate([p + c for p, c in seqs],
                                                                      [len(p) for p, _ in seqs], pad_id))
    if isinstance(getattr(model, "module", model), LogProbModule):
        token = model(input_ids, attention, completion)
    else:
        token = token_logprobs(model, input_ids, attention, completion, chunk_size=chunk_size)
    return token.sum(-1), int(attention.sum()), attention.numel()


def unpaired_logps(model, items, kl_seqs=None, *, pad_id: int, device="cpu", chunk_size: int = DEFAULT_CHUNK,
                   prefix_sharing: bool = False, kl_model=None) -> UnpairedLogps:
    """Policy log-probs of unpaired examples (``prompt_ids``, ``completion_ids``) and, with ``kl_seqs``
    ((prompt ids, completion ids) per example), of their KL completions, without gradient.

    ``prefix_sharing``: one packed row ``[prompt | completion | KL completion]`` per example, the prompt
    computed once; where the KL prompt differs from the example's (keep_end truncation cut it), the KL
    completion gets a packed row of its own. Without sharing, the completions run as sequences through
    ``model`` and the KL ones through ``kl_model`` (default ``model``; the unwrapped module under DDP) with
    gradients off. The same numbers either way, to float rounding.
    """
    module = model if isinstance(getattr(model, "module", model), LogProbModule) else None
    lm = getattr(model, "module", model).model if module is not None else model
    if not resolve_sharing(lm, prefix_sharing):
        own, n_tokens, n_positions = _sequence_sums(model, [(i.prompt_ids, i.completion_ids) for i in items],
                                                    pad_id=pad_id, device=device, chunk_size=chunk_size)
        kl = None
        if kl_seqs is not None:
            with torch.no_grad():  # TRL: the KL term carries no gradient
                kl, kl_tokens, kl_positions = _sequence_sums(kl_model or model, kl_seqs, pad_id=pad_id, device=device,
                                                             chunk_size=chunk_size)
            n_tokens, n_positions = n_tokens + kl_tokens, n_positions + kl_positions
        return UnpairedLogps(own, kl, n_tokens, n_positions)
    rows, apart, apart_rows = [], [], []  # apart: (example, row) of KL completions whose prompt differs
    for k, item in enumerate(items):
        kl_prompt, kl_completion = kl_seqs[k] if kl_seqs is not None else (item.prompt_ids, None)
        if kl_completion is not None and list(kl_prompt) == list(item.prompt_ids):
            rows.append((item.prompt_ids, [item.completion_ids, kl_completion]))
        else:
            rows.append((item.prompt_ids, [item.completion_ids]))
            if kl_completion is not None:  # its own row, after the examples' rows
                apart.append((k, len(items) + len(apart_rows)))
                apart_rows.append((kl_prompt, [kl_completion]))
    packed = pack(rows + apart_rows, pad_id).to(device)
    token = packed_token_logprobs(lm, packed, chunk_size=chunk_size, module=module)  # [N, T]
    b = len(items)
    own = (token[:b] * (packed.segments[:b] == 1)).sum(-1)
    kl = None
    if kl_seqs is not None:
        kl = (token[:b] * (packed.segments[:b] == 2)).sum(-1).detach()
        if apart:
            at, row = (torch.tensor(v, device=kl.device) for v in zip(*apart, strict=True))
            kl = kl.index_copy(0, at, (token[row] * (packed.segments[row] == 1)).sum(-1).detach())
    return UnpairedLogps(own, kl, packed.n_tokens, packed.input_ids.numel())
