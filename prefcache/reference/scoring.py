"""The model side of the reference pass (:mod:`prefcache.reference.shards`): the reference loaded as the kernel's
module (sharded across the ranks with ``--fsdp``), the unique sequences of a shard scored (two sequences, or
packed rows sharing each prompt), and the progress bar.
"""

from __future__ import annotations

import sys
import time

from prefcache.model.load import load_model
from prefcache.reference.config import PrecomputeConfig
from prefcache.reference.kinds import sequence_key


def load_scorer(config: PrecomputeConfig, source, quantization: str, device: str, pad_id: int, world: int):
    """(the reference model, the kernel's module to score with). With ``--fsdp`` on more than one rank the model is
    loaded on the host and sharded onto the ranks' devices (:mod:`prefcache.model.sharding`), so a reference bigger
    than one device fits; every forward is then a collective, kept in step by a :class:`Lockstep`."""
    from prefcache.model.kernel import LogProbModule  # torch
    from prefcache.model.sharding import Lockstep, shard, unsharded_note

    sharded = config.fsdp and world > 1
    if config.fsdp and world == 1:
        print(unsharded_note("precompute"), file=sys.stderr)
    model, _ = load_model(source, quantize=quantization, device="cpu" if sharded else device, adapter=config.adapter)
    scorer = LogProbModule(model, chunk_size=config.chunk_size)
    if sharded:
        scorer = Lockstep(shard(scorer, model, device), device, pad_id)
    return model, scorer


def score_sequences(scorer, sequences: list[tuple[list[int], int]], *, batch_size: int, pad_id: int, device: str,
                    on_batch=None, images: list | None = None, vision=None) -> list:
    """Score unique (token ids, completion start) sequences, longest first, in padded batches.

    ``scorer``: the kernel's :class:`~prefcache.model.kernel.LogProbModule` over the model (sharded, a
    :class:`~prefcache.model.sharding.Lockstep` over it). Returns, per sequence, a numpy fp32 array of its
    completion tokens' log-probs (nats). ``on_batch(n_sequences, n_tokens)`` is called after each batch (progress).
    ``images[i]``: sequence i's :class:`~prefcache.data.images.ImageRef` tuple, ``vision(rows' image tuples)``
    their tensors for a batch (a vision-language model).
    """
    import torch

    from prefcache.model.kernel import collate  # torch

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # length buckets: little padding
    out: list = [None] * len(sequences)
    with torch.no_grad():  # not inference_mode: a sharded model reuses its gathered weights outside it (drain)
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            input_ids, attention, completion = collate(
                [sequences[i][0] for i in idx], [sequences[i][1] for i in idx], pad_id
            )
            pixels = vision([images[i] for i in idx]) if vision else None
            logps = scorer(input_ids.to(device), attention.to(device), completion.to(device), vision=pixels).cpu()
            for row, i in enumerate(idx):
                ids, start = sequences[i]
                out[i] = logps[row, start : len(ids)].numpy()
            if on_batch:
                on_batch(len(idx), int(attention.sum()))
    return out


class Progress:
    """The pass's bar. It moves per batch (examples in proportion to the shard's sequences scored), so its
    rate is live; tokens/s counts the real (unpadded) tokens scored."""

    def __init__(self, bar):
        self.bar, self.tokens, self.t_start = bar, 0, time.perf_counter()
        self.start = self.n_keys = self.n_examples = self.seqs = 0

    def shard(self, start: int, n_keys: int, n_examples: int) -> None:
        """A shard of ``n_examples`` examples (``n_keys`` unique sequences) begins, the bar at ``start``."""
        self.start, self.n_keys, self.n_examples, self.seqs = start, n_keys, n_examples, 0

    def __call__(self, n_seqs: int, n_tokens: int) -> None:
        self.tokens, self.seqs = self.tokens + n_tokens, self.seqs + n_seqs
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(self.start + int(self.seqs / self.n_keys * self.n_examples) - self.bar.n)


def score_shard(scorer, shard: list, config: PrecomputeConfig, kind, *, sharing: bool, pad_id: int, device: str,
                progress: Progress, start: int, processor=None) -> dict[str, list]:
    """The cache columns of one shard (``start``: examples scored before it); an identical (prompt, completion)
    sequence is scored once. With ``sharing`` the sequences are packed one prompt a row: a pair's two completions,
    or an unpaired example's completion and KL completion; a KL sequence whose prompt was cut differently
    (``keep_end``) has a prompt of its own, so it gets a row of its own, which is the plain sequence.
    ``processor``: a vision-language model's; a sequence is then its tokens and its prompt's images (the same
    image tokens stand for other pictures), and each batch gets its images' tensors."""
    from prefcache.model.vision import vision_inputs

    unique: dict[tuple, tuple[int, tuple]] = {}
    for example in shard:
        for prompt, completion in kind.sequences(example):
            unique.setdefault(sequence_key(example, prompt, completion), (len(prompt), getattr(example, "images", ())))
    keys = list(unique)
    progress.shard(start, len(keys), len(shard))
    sequences = [(list(k[1]), unique[k][0]) for k in keys]
    pictures = {"images": [unique[k][1] for k in keys],
                "vision": lambda rows: vision_inputs(rows, processor, device)} if processor is not None else {}
    if sharing:  # a prompt once per packed row, for all of its unique completions in the shard
        from prefcache.model.packing import score_shared  # torch

        logps = score_shared(scorer.model, sequences, batch_size=config.batch_size, pad_id=pad_id,
                             chunk_size=config.chunk_size, device=device, max_row=2 * config.max_length,
                             on_batch=progress, module=scorer, **pictures)
    else:
        logps = score_sequences(scorer, sequences, batch_size=2 * config.batch_size, pad_id=pad_id, device=device,
                                on_batch=progress, **pictures)
    return kind.columns(shard, dict(zip(keys, logps, strict=True)))
