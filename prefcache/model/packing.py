"""Prefix sharing: a prompt goes through the model once for all of its completions.

A packed row is ``[prompt | completion 1 | completion 2 | ...]`` (a preference pair is
``[prompt | chosen | rejected]``) with

- a block attention mask: each completion sees the prompt and its own earlier tokens, never another
  completion (``[N, 1, T, T]``, handed to the model as a prepared mask, which transformers uses as it is);
- position ids that restart every completion right after the prompt, so each completion sits at the
  positions it has in its own ``prompt + completion`` sequence;
- a source index: the first token of each completion is predicted from the prompt's last hidden state,
  the others from the token before them.

So every completion token gets the log-prob it gets in the two-sequence path (to float rounding), while
the prompt's tokens are computed once, and, in training, its gradient flows back through one copy. On
prompt-heavy data (long prompts, short answers) that is most of the work.

A model takes the custom mask only through attention implementations that read a dense mask (``sdpa``,
``eager``); FlashAttention-2, flex-attention and sliding-window attention would ignore or reshape it, so
:func:`sharing_problem` names the reason and the callers fall back to the two-sequence path.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from prefcache.model.kernel import DEFAULT_CHUNK, _unwrap, token_logprobs
from prefcache.model.vision import vision_backbone

log = logging.getLogger("prefcache")
MASKABLE = ("sdpa", "eager")  # attention implementations that apply a prepared [N, 1, T, T] mask as given
PAD, PROMPT = -1, 0  # segment ids; completion k of a row has segment k (1, 2, ...)


@dataclass
class PackedRows:
    """Tensors of packed rows, each [N, T] (T = longest row), right-padded.

    segments: -1 pad, 0 prompt, k for the k-th completion (1-based); completion_mask: 1 on completion
    tokens; source: the position whose hidden state predicts token t; n_tokens: real tokens in all rows.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segments: torch.Tensor
    completion_mask: torch.Tensor
    source: torch.Tensor
    n_tokens: int

    def to(self, device) -> PackedRows:
        return PackedRows(*(t.to(device) for t in (self.input_ids, self.position_ids, self.segments,
                                                      self.completion_mask, self.source)), self.n_tokens)


def pack(rows: list[tuple[list[int], list[list[int]]]], pad_id: int) -> PackedRows:
    """``[(prompt_ids, [completion_ids, ...]), ...]`` -> :class:`PackedRows`. Every prompt needs >= 1 token."""
    width = max((len(p) + sum(len(c) for c in cs) for p, cs in rows), default=0)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, PAD, dtype=torch.long)
    source = torch.zeros(shape, dtype=torch.long)
    for i, (prompt, completions) in enumerate(rows):
        n = len(prompt)
        if n == 0:
            raise ValueError(f"row {i}: an empty prompt cannot be shared (its completions have no context)")
        ids, pos, seg, src = list(prompt), list(range(n)), [PROMPT] * n, [max(t - 1, 0) for t in range(n)]
        for k, completion in enumerate(completions, start=1):
            start = len(ids)
            ids += completion
            pos += range(n, n + len(completion))
            seg += [k] * len(completion)
            src += [n - 1] + list(range(start, start + len(completion) - 1))  # first token: from the prompt
        length = len(ids)
        input_ids[i, :length] = torch.tensor(ids, dtype=torch.long)
        position_ids[i, :length] = torch.tensor(pos, dtype=torch.long)
        segments[i, :length] = torch.tensor(seg, dtype=torch.long)
        source[i, :length] = torch.tensor(src, dtype=torch.long)
    completion_mask = (segments > PROMPT).long()
    return PackedRows(input_ids, position_ids, segments, completion_mask, source, int((segments != PAD).sum()))


def block_mask(segments: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """[N, T] segments -> [N, 1, T, T] mask: query q may attend to key k when k <= q and k is in the
    prompt or in q's own completion. Pads attend to themselves only (no all-masked row, so no NaN).
    ``dtype`` None: bool (True = may attend, for SDPA); a float dtype: additive (0 / most negative)."""
    q, k = segments[:, :, None], segments[:, None, :]  # [N, T, 1], [N, 1, T]
    t = segments.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & (q != PAD) & ((k == PROMPT) | (k == q))
    allowed |= torch.eye(t, dtype=torch.bool, device=segments.device)
    allowed = allowed[:, None]  # [N, 1, T, T]
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)


def sharing_problem(model) -> str | None:
    """Why ``model`` cannot run packed rows correctly, or None when it can.

    A vision-language model's multimodal backbone hands the prepared mask and the position ids to its language
    model as they are (LLaVA, Idefics3), so a row ``[prompt with image tokens | chosen | rejected]`` packs like
    text, its image features computed once; one whose rotary positions are multimodal (Qwen2-VL, Qwen2.5-VL:
    3D positions from ``image_grid_thw`` through ``get_rope_index``) needs more than 1D positions that restart."""
    lm = _unwrap(model)
    config = getattr(lm, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    impl = getattr(text, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    if impl not in MASKABLE:
        return f"attention implementation {impl!r} does not apply a custom block mask (needs one of {MASKABLE})"
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            return "sliding-window attention reshapes the mask"
    get_decoder = getattr(lm, "get_decoder", None)
    backbone = get_decoder() if get_decoder is not None else lm
    if backbone is None or "position_ids" not in inspect.signature(backbone.forward).parameters:
        return "the model does not take position ids"
    if _multimodal_positions(lm, text):
        return ("multimodal rotary positions (image_grid_thw through get_rope_index, as in Qwen2-VL) "
                "need more than position ids that restart after the prompt")
    return None


def _multimodal_positions(lm, text_config) -> bool:
    """Whether a vision-language model's rotary positions are 3D (time, height, width of each image token, made
    from ``image_grid_thw`` by the backbone's ``get_rope_index``: Qwen2-VL, Qwen2.5-VL) rather than 1D."""
    rope = getattr(text_config, "rope_parameters", None)
    backbone = vision_backbone(lm)
    return backbone is not None and (hasattr(backbone, "get_rope_index")
                                     or (isinstance(rope, dict) and bool(rope.get("mrope_section"))))


_warned: set[str] = set()


def resolve_sharing(model, wanted: bool) -> bool:
    """Whether to pack: ``wanted`` unless the model cannot, which is said once (one warning line)."""
    if not wanted:
        return False
    problem = sharing_problem(model)
    if problem is None:
        return True
    if problem not in _warned:
        _warned.add(problem)
        log.warning("prefix sharing off, two sequences per pair instead: %s", problem)
    return False


def mask_for(model, segments: torch.Tensor) -> torch.Tensor:
    """The block mask in the form the model's attention implementation reads: bool for SDPA (an eighth of
    an fp32 mask's memory), additive in the compute dtype for eager attention."""
    lm = _unwrap(model)
    if getattr(lm.config, "_attn_implementation", None) == "eager":
        return block_mask(segments, lm.get_input_embeddings().weight.dtype)
    return block_mask(segments)


def packed_token_logprobs(model, packed: PackedRows, *, chunk_size: int = DEFAULT_CHUNK, module=None,
                          with_sq: bool = False, vision: dict | None = None):
    """[N, T] fp32 log-probs of the completion tokens of packed rows (0 elsewhere), through the shared kernel.
    ``module``: a (DDP-wrapped) LogProbModule over ``model`` to run instead, so DDP's hooks see the forward.
    ``with_sq``: also the [N, T] log Σ_v p(v)² WPO needs (see ``token_logprobs``).
    ``vision``: the image tensors of the rows' prompts, one prompt per row, so each image is encoded once."""
    mask = mask_for(model, packed.segments)
    if module is not None:
        return module(packed.input_ids, mask, packed.completion_mask, position_ids=packed.position_ids,
                      source=packed.source, with_sq=with_sq, vision=vision)
    return token_logprobs(model, packed.input_ids, mask, packed.completion_mask, chunk_size=chunk_size,
                          position_ids=packed.position_ids, source=packed.source, with_sq=with_sq, vision=vision)


def group_by_prompt(sequences: list[tuple[list[int], int]], max_row: int,
                    tags: list[tuple] | None = None) -> list[tuple[list[int], list[list[int]], tuple]]:
    """Unique (token ids, completion start) sequences -> packed rows, one prompt per row with as many of its
    completions as fit in ``max_row`` tokens (at least one). ``tags[i]``: what else sequence i's prompt holds
    (a vision pair's image hashes: the same image tokens stand for other pictures); only sequences with equal
    tags share a row. Returns ``[(prompt_ids, [completion_ids, ...], tag)]`` in first-seen order of the prompts."""
    groups: dict[tuple, list[list[int]]] = {}
    for i, (ids, start) in enumerate(sequences):
        groups.setdefault((tags[i] if tags else (), tuple(ids[:start])), []).append(list(ids[start:]))
    rows = []
    for (tag, prompt), completions in groups.items():
        row: list[list[int]] = []
        length = len(prompt)
        for c in completions:
            if row and length + len(c) > max_row:
                rows.append((list(prompt), row, tag))
                row, length = [], len(prompt)
            row.append(c)
            length += len(c)
        rows.append((list(prompt), row, tag))
    return rows


def completion_logps(packed: PackedRows, token: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per row, per completion (in order), its [len] token log-probs out of ``token`` [N, T]."""
    out = []
    for i in range(token.shape[0]):
        seg = packed.segments[i]
        n = int(seg.max().item()) if seg.numel() else 0
        out.append([token[i][seg == k] for k in range(1, n + 1)])
    return out


def score_shared(model, sequences: list[tuple[list[int], int]], *, batch_size: int, pad_id: int, chunk_size: int,
                 device: str, max_row: int, on_batch=None, module=None, images: list | None = None,
                 vision=None) -> list:
    """:func:`prefcache.reference.shards.score_sequences` with prefix sharing: the unique sequences are grouped by
    prompt into packed rows (:func:`group_by_prompt`), ``batch_size`` rows per forward pass, longest first.

    Returns, per sequence, a numpy fp32 array of its completion tokens' log-probs (nats).
    ``on_batch(n_sequences, n_tokens)`` is called after each batch (real tokens computed, the prompt once).
    ``module``: the LogProbModule over ``model`` to run (see :func:`packed_token_logprobs`).
    ``images[i]``: sequence i's prompt's :class:`~prefcache.data.images.ImageRef` tuple (a vision-language model),
    ``vision(rows' image tuples)`` their tensors for a batch: each row's images are encoded once for its completions.
    """
    tags = [tuple(r.sha256 for r in im) for im in images] if images else None
    pictures = dict(zip(tags, images, strict=True)) if images else {}
    rows = group_by_prompt(sequences, max_row, tags)
    rows.sort(key=lambda r: -(len(r[0]) + sum(len(c) for c in r[1])))
    found: dict[tuple, object] = {}
    with torch.no_grad():  # not inference_mode: a sharded model reuses its gathered weights outside it (drain)
        for b in range(0, len(rows), batch_size):
            batch = rows[b : b + batch_size]
            packed = pack([(prompt, completions) for prompt, completions, _ in batch], pad_id)
            pixels = vision([pictures[tag] for _, _, tag in batch]) if vision else None
            token = packed_token_logprobs(model, packed.to(device), chunk_size=chunk_size, module=module,
                                          vision=pixels).cpu()
            for (prompt, completions, tag), logps in zip(batch, completion_logps(packed, token), strict=True):
                for c, lp in zip(completions, logps, strict=True):
                    found[tag, tuple(prompt + c)] = lp.numpy()
            if on_batch:
                on_batch(sum(len(cs) for _, cs, _ in batch), packed.n_tokens)
    return [found[tags[i] if tags else (), tuple(ids)] for i, (ids, _) in enumerate(sequences)]


def training_sharing(wanted: bool | None, cache_meta: dict | None, model) -> bool:
    """Whether training packs pairs: ``wanted``, or None = as the reference cache was made (no cache: yes),
    unless the model cannot take the mask. A path other than the cache's is allowed, with a warning: the
    two agree to float rounding, so the step-0 rewards are ~0 rather than exactly 0."""
    cached = None if cache_meta is None else bool(cache_meta.get("prefix_sharing", False))
    use = resolve_sharing(model, (True if cached is None else cached) if wanted is None else wanted)
    if cached is not None and use != cached:
        say = lambda on: "with" if on else "without"  # noqa: E731
        log.warning("the reference cache was made %s prefix sharing, training runs %s it: policy and reference "
                    "log-probs then agree to float rounding (~1e-5 nats per sequence), not exactly",
                    say(cached), say(use))
    return use
