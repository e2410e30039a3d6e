"""The log-prob kernel shared by precompute, train and score.

The [batch, time, vocab] logits are the largest tensor of this workload (SmolLM2: 49k vocab, so 8
sequences x 256 tokens is ~400 MB of fp32 logits, and log-softmax plus the gradients add as much
again). So the kernel never builds them: it runs the backbone to hidden states, keeps only the
positions that predict completion tokens, and projects those through the output head a chunk at a
time, upcasting each chunk to fp32 and discarding its logits. When gradients are on, each chunk is
wrapped in activation checkpointing, so backward recomputes that chunk's logits instead of keeping
all of them alive.

Numerics: ``z[target] - logsumexp(z)`` in fp32, which agrees with float64 to ~4e-6 per token
(``torch.log_softmax`` in fp32 on CPU drifts by ~1e-5 per token and adds up on long answers).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

from prefcache.model.vision import fit_vision, vision_backbone

DEFAULT_CHUNK = 2048  # completion positions per head projection: 2048 x 49k fp32 = 400 MB worst case


def _unwrap(model: nn.Module) -> nn.Module:
    """The causal LM under DDP / PEFT wrappers (PEFT's LoRA layers stay injected and active)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "lm_head"):
            model = model.module  # DDP / DataParallel
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # PeftModel -> model with adapters injected
        else:
            return model


def _head_parts(lm: nn.Module, vision: bool = False):
    """(backbone, head, postprocess) of a transformers causal LM, or None when it does not split. With
    ``vision``, the backbone is a vision-language model's multimodal one (it takes the image tensors)."""
    get_decoder = getattr(lm, "get_decoder", None)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if vision:
        backbone = vision_backbone(lm)
    else:
        backbone = get_decoder() if get_decoder is not None else None
    if backbone is None or head is None:
        return None
    cfg = getattr(lm, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg  # a VLM's head is its text model's
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(lm, "logit_scale", None)  # Cohere-style scaled logits
    if isinstance(scale, torch.Tensor):
        scale = None  # a learned scale: not worth special-casing, the naive path handles it
    return backbone, head, softcap, scale


def _chunk_logps(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap, scale, with_sq: bool = False):
    """[n, H] hidden states, [n] targets -> [n] fp32 log-probs of the targets; with ``with_sq`` also
    [n] log Σ_v p(v)², without gradient (WPO's weights, TRL's ``log_sum_sq_probs``)."""
    logits = head(hidden).float()
    if scale is not None:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if with_sq:
        with torch.no_grad():
            z = logits.detach()
            log_sum_sq = torch.logsumexp(2 * z, dim=-1) - 2 * torch.logsumexp(z, dim=-1)
        return picked - torch.logsumexp(logits, dim=-1), log_sum_sq
    if not logits.requires_grad:  # no autograd (precompute, scoring): logsumexp in place, no second [n, V]
        top = logits.amax(-1, keepdim=True)
        return picked - (top.squeeze(-1) + logits.sub_(top).exp_().sum(-1).log())
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    checkpoint: bool | None = None,
    aux: list | None = None,
    position_ids: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    with_sq: bool = False,
    vision: dict | None = None,
):
    """Per-token log-probs of the completion tokens, without full-vocabulary logits.

    Args:
        model: a transformers causal LM, optionally PEFT- or DDP-wrapped, any precision.
        input_ids: [N, T] prompt + completion token ids, right-padded.
        attention_mask: [N, T] 1 on real tokens; or a prepared [N, 1, T, T] mask (bool, True = may attend,
            or additive float) that the model uses as it is (packed rows, see ``prefcache.model.packing``).
        completion_mask: [N, T] 1 on the completion tokens whose log-prob is wanted.
        chunk_size: completion positions projected through the output head at once.
        checkpoint: recompute each chunk's logits in backward; defaults to ``torch.is_grad_enabled()``.
        aux: for a mixture-of-experts model, a list the router load-balancing loss (a scalar, unscaled:
            see :func:`router_aux_coef`) is appended to; None = not computed.
        position_ids: [N, T] positions for the model (packed rows restart a completion after the prompt).
        source: [N, T] long, the position whose hidden state predicts token t; default t - 1.
        with_sq: also return [N, T] fp32 log Σ_v p(v)² of each completion position (0 elsewhere), without
            gradient: the per-token values WPO's weights need.
        vision: a vision-language model's image tensors for these rows, as its processor returns them
            (``pixel_values``, ``pixel_attention_mask``, ``image_sizes``, ``image_grid_thw``...): the hidden
            states then come from the multimodal backbone. Image tokens are prompt tokens.

    Returns:
        [N, T] fp32: at t, log p(input_ids[t] | context) in nats where completion_mask[t] is 1, else 0.
        ``.sum(-1)`` is the summed completion log-prob. Position 0 is never a completion token
        (it has no context), so a completion mask there is ignored.
    """
    lm = _unwrap(model)
    vision = fit_vision(vision, input_ids, lm)
    parts = _head_parts(lm, vision is not None)
    if parts is None:
        return naive_token_logprobs(model, input_ids, attention_mask, completion_mask,
                                    position_ids=position_ids, source=source, with_sq=with_sq, vision=vision)
    backbone, head, softcap, scale = parts
    if checkpoint is None:
        checkpoint = torch.is_grad_enabled()

    hidden = _hidden_states(backbone, lm, input_ids, attention_mask, position_ids, aux, vision)  # [N, T, H]
    want = _wanted(attention_mask, completion_mask)  # [N, T]
    rows, cols = want.nonzero(as_tuple=True)
    # The hidden state at source[t] (t - 1 unless packed) predicts token t.
    h = hidden[rows, cols - 1 if source is None else source[rows, cols]]  # [n, H]
    targets = input_ids[rows, cols]  # [n]

    flat, sq_flat = _chunked_head(h, targets, head, softcap, scale, chunk_size=chunk_size, checkpoint=checkpoint,
                                  with_sq=with_sq)

    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    # index_put keeps the graph: out[want] = flat, written so autograd sees it.
    out = out.index_put((rows, cols), flat)
    if not with_sq:
        return out
    return out, torch.zeros_like(out).index_put((rows, cols), sq_flat)


def _hidden_states(backbone, lm, input_ids, attention_mask, position_ids, aux: list | None,
                   vision: dict | None = None) -> torch.Tensor:
    """[N, T, H] last hidden states; for a mixture-of-experts model with ``aux`` given, its router
    load-balancing loss is appended to ``aux``; ``vision``: the image tensors, for a multimodal backbone."""
    moe = aux is not None and router_aux_coef(lm) is not None
    extra = {} if position_ids is None else {"position_ids": position_ids}
    if moe:
        extra["output_router_logits"] = True
    # Through the wrapper when there is one, so PEFT / DDP forward hooks still run.
    output = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra, **(vision or {}))
    if moe:
        aux.append(_load_balancing_loss(lm, output.router_logits, attention_mask))
    return output[0]


def _chunked_head(h, targets, head, softcap, scale, *, chunk_size: int, checkpoint: bool, with_sq: bool):
    """([n] fp32 log-probs of ``targets`` from hidden states ``h`` [n, H], [n] log Σ p² detached or None), the
    output head applied ``chunk_size`` positions at a time; with ``checkpoint`` each chunk's logits are
    recomputed in backward instead of kept."""
    pieces, sq_pieces = [], []
    for start in range(0, h.shape[0], chunk_size):
        hc, tc = h[start : start + chunk_size], targets[start : start + chunk_size]
        if checkpoint and hc.requires_grad:
            piece = _checkpoint(_chunk_logps, hc, tc, head, softcap, scale, with_sq, use_reentrant=False)
        else:
            piece = _chunk_logps(hc, tc, head, softcap, scale, with_sq)
        if with_sq:
            piece, sq = piece
            sq_pieces.append(sq.detach())
        pieces.append(piece)
    empty = h.new_zeros(0, dtype=torch.float32)
    flat = torch.cat(pieces) if pieces else empty
    return flat, (torch.cat(sq_pieces) if sq_pieces else empty) if with_sq else None


def collate(seqs: list[list[int]], completion_starts: list[int], pad_id: int):
    """Right-pad token sequences into ``input_ids``, ``attention_mask``, ``completion_mask``, each [N, T]
    int64 (T = longest sequence); ``completion_mask`` is 1 on positions ``completion_starts[i] <= t < len``."""
    if len(seqs) != len(completion_starts):
        raise ValueError(f"{len(seqs)} sequences but {len(completion_starts)} completion starts")
    width = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(seqs, completion_starts, strict=True)):
        if not 0 <= start <= len(seq):
            raise ValueError(f"sequence {i}: completion start {start} outside 0..{len(seq)}")
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[i, : len(seq)] = 1
        completion[i, start : len(seq)] = 1
    return input_ids, attention, completion


def pair_sums(chosen: tuple[torch.Tensor, torch.Tensor], rejected: tuple[torch.Tensor, torch.Tensor]):
    """The one reduction of the kernel's output for a pair: each side's ``(token log-probs [B, T], completion
    mask [B, T] bool)`` -> ``(totals, prefixes, counts)``, each a (chosen, rejected) pair of [B] tensors.

    total: the summed completion log-prob (nats), in the dtype of the token values (the cache passes float64,
    the trainer fp32). prefix: the sum over the first min(chosen, rejected) completion tokens, LD-DPO's
    "public" length. counts: completion tokens (long).
    """
    sides = (chosen, rejected)
    counts = tuple(mask.long().sum(-1) for _, mask in sides)
    shared = torch.minimum(*counts)
    totals, prefixes = [], []
    for tok, mask in sides:
        # Position of each completion token within its completion: 1, 2, ... ; prefix = the first `shared`.
        rank = mask.long().cumsum(-1) * mask
        prefixes.append((tok * ((rank > 0) & (rank <= shared[:, None]))).sum(-1))
        totals.append((tok * mask).sum(-1))
    return tuple(totals), tuple(prefixes), counts


def _wanted(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """[N, T] bool: completion tokens that are real tokens, never position 0 (no context)."""
    want = completion_mask.bool().clone()
    if attention_mask.dim() == 2:
        want &= attention_mask.bool()
    want[:, 0] = False
    return want


def naive_token_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
    with_sq: bool = False,
    vision: dict | None = None,
):
    """The textbook computation (full [N, T, V] logits, fp32 log-softmax) with the same contract as
    :func:`token_logprobs`. Kept for tests, benchmarks and models whose head cannot be split off."""
    extra = {} if position_ids is None else {"position_ids": position_ids}
    extra.update(fit_vision(vision, input_ids, _unwrap(model)) or {})
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits.float()
    logps = torch.log_softmax(logits, dim=-1)  # [N, T, V]: position s predicts token s + 1
    if source is None:
        source = (torch.arange(input_ids.shape[1], device=input_ids.device) - 1).clamp(min=0).expand_as(input_ids)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)[:, None].expand_as(input_ids)
    picked = logps[rows, source, input_ids]  # [N, T]
    want = _wanted(attention_mask, completion_mask).float()
    if not with_sq:
        return picked * want
    sq = torch.logsumexp(2 * logps.detach(), dim=-1)[rows, source]  # log Σ_v p(v)² of the predicting position
    return picked * want, sq * want


def router_aux_coef(model: nn.Module) -> float | None:
    """A mixture-of-experts model's own weight of its router load-balancing loss (``router_aux_loss_coef``,
    what its ``forward`` adds to the LM loss); None for a dense model or a coefficient of 0."""
    cfg = getattr(_unwrap(model), "config", None)
    coef = getattr(cfg, "router_aux_loss_coef", None)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    return float(coef) if coef and experts else None


def _load_balancing_loss(lm: nn.Module, router_logits, attention_mask) -> torch.Tensor:
    """The Switch-Transformer load-balancing loss, computed by the model's own module (Mixtral, Qwen2-MoE,
    Qwen3-MoE... each ship ``load_balancing_loss_func``) exactly as its ``forward`` does."""
    import importlib

    fn = importlib.import_module(type(lm).__module__).load_balancing_loss_func
    cfg = lm.config
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
    if attention_mask.dim() == 4:  # a packed row's [N, 1, T, T] block mask: real tokens are those that see themselves
        diag = attention_mask.diagonal(dim1=-2, dim2=-1)[:, 0]
        attention_mask = (diag if diag.dtype == torch.bool else diag == 0).long()
    return fn(router_logits, experts, cfg.num_experts_per_tok, attention_mask)


class LogProbModule(nn.Module):
    """nn.Module face of :func:`token_logprobs`, so DDP can wrap the whole computation.

    ``router_aux``: with gradients on, a mixture-of-experts model's router load-balancing loss of the last
    forward is left in ``aux_loss`` (None otherwise), for the trainer to add to its loss."""

    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK, router_aux: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.router_aux = router_aux and router_aux_coef(model) is not None
        self.aux_loss = None

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, source=None, with_sq=False,
                vision=None):
        aux = [] if self.router_aux and torch.is_grad_enabled() else None
        out = token_logprobs(self.model, input_ids, attention_mask, completion_mask, chunk_size=self.chunk_size,
                             position_ids=position_ids, source=source, aux=aux, with_sq=with_sq, vision=vision)
        self.aux_loss = aux[0] if aux else None
        return out
