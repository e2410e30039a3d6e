"""The kinds of example the reference pass scores, as variants of one pass (:mod:`prefcache.reference.shards`).

A kind says only what differs between kinds; the pass does everything else once (the lock, the extension checks,
bad rows, progress, shard writing, the rank split, the final check):

- ``blocks(tokenizer, block_rows)``: the tokenised examples and bad rows, block by block (bounded memory);
- ``sequences(example)``: the (prompt ids, completion ids) sequences an example needs scored;
- ``length(example)``: its longest sequence in tokens (shards are scored longest first);
- ``columns(shard, token_logps)``: the shard's cache columns from per-sequence token log-probs;
- ``schema()``, ``metadata()``: the shards' table schema and the kind's own metadata keys;
- ``check()``: options this kind refuses; ``summary(n_ids)``: its entries in the pass's result.

:class:`PairKind`: a prompt with its chosen and rejected completions. :class:`UnpairedKind` (KTO): a prompt with
its completion and its KL completion (:mod:`prefcache.data.unpaired`).
"""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.schemas import UNPAIRED_CACHE, cache_schema
from prefcache.data.columns import RowMapping
from prefcache.data.pairs import iter_pair_blocks
from prefcache.data.unpaired import (
    DEFAULT_KL_GROUP,
    TokenizedCompletion,
    check_no_mapping,
    iter_unpaired_blocks,
    kl_sequence,
)
from prefcache.data.vision_pairs import VISION_BLOCK_ROWS, iter_vision_pair_blocks
from prefcache.model.vision import processor_record
from prefcache.reference.config import PrecomputeConfig


def kind_of(config: PrecomputeConfig, processor=None):
    """The kind of example ``config`` asks to cache; ``processor``: the model's when it is a vision-language model."""
    if processor is None:
        return UnpairedKind(config) if config.unpaired else PairKind(config)
    if config.unpaired:
        raise ValueError("--unpaired (KTO) caches are for text models: a vision-language model's data is cached "
                         "as pairs (drop --unpaired)")
    return VisionKind(config, processor)


def sequence_key(example, prompt: list[int], completion: list[int]) -> tuple:
    """What a scored sequence is: its prompt's images' hashes (none for text: image tokens are placeholders, the
    same for every picture) and its token ids. An identical key is scored once."""
    return tuple(r.sha256 for r in getattr(example, "images", ())), tuple(prompt + completion)


class PairKind:
    """Preference pairs: ``prompt + chosen`` and ``prompt + rejected``, one cache row a pair."""

    unit = "pair"

    def __init__(self, config: PrecomputeConfig):
        self.config = config

    def check(self) -> None:
        pass

    def metadata(self) -> dict:
        return {}  # caches of pairs carry no "kind" (older caches never did)

    def schema(self):
        return cache_schema(self.config.per_token)

    def blocks(self, tokenizer, block_rows: int):
        c = self.config
        yield from iter_pair_blocks(c.data, tokenizer, c.max_length, c.truncation, c.on_bad_row, split=c.split,
                                    data_config=c.data_config, mapping=RowMapping.of(c), block_rows=block_rows)

    @staticmethod
    def sequences(p) -> tuple:
        return (p.prompt_ids, p.chosen_ids), (p.prompt_ids, p.rejected_ids)

    @staticmethod
    def length(p) -> int:
        return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))

    def columns(self, shard: list, token_logps: dict) -> dict[str, list]:
        return shard_columns(shard, token_logps, self.config.per_token)

    @staticmethod
    def summary(n_ids: int) -> dict:
        return {"pairs_in_data": n_ids}


def shard_columns(pairs, token_logps: dict, per_token: bool) -> dict[str, list]:
    """Cache columns for ``pairs`` from per-sequence token log-probs keyed by :func:`sequence_key`.

    The sums are :func:`~prefcache.model.kernel.pair_sums`, the trainer's own reduction, in float64: the
    per-token values are fp32, their sum need not lose more.
    """
    import torch

    from prefcache.model.kernel import pair_sums  # torch

    chosen = [token_logps[sequence_key(p, p.prompt_ids, p.chosen_ids)] for p in pairs]
    rejected = [token_logps[sequence_key(p, p.prompt_ids, p.rejected_ids)] for p in pairs]

    def padded(values):  # [B, T] float64 values and their mask
        lengths = torch.tensor([len(v) for v in values])
        tok = torch.zeros(len(values), max((len(v) for v in values), default=0), dtype=torch.float64)
        for row, v in enumerate(values):
            tok[row, : len(v)] = torch.from_numpy(v)
        return tok, torch.arange(tok.shape[1])[None, :] < lengths[:, None]

    (total_c, total_r), (prefix_c, prefix_r), _ = pair_sums(padded(chosen), padded(rejected))
    cols = {"id": [p.id for p in pairs], "chosen_logps": total_c.tolist(), "rejected_logps": total_r.tolist(),
            "chosen_logps_prefix": prefix_c.tolist(), "rejected_logps_prefix": prefix_r.tolist(),
            "prompt_tokens": [len(p.prompt_ids) for p in pairs], "chosen_tokens": [len(p.chosen_ids) for p in pairs],
            "rejected_tokens": [len(p.rejected_ids) for p in pairs],
            "chosen_truncated": [p.chosen_truncated for p in pairs],
            "rejected_truncated": [p.rejected_truncated for p in pairs]}
    if per_token:
        cols["chosen_token_logps"] = [v.tolist() for v in chosen]
        cols["rejected_token_logps"] = [v.tolist() for v in rejected]
    return {name: cols[name] for name in cache_schema(per_token).names}


class VisionKind(PairKind):
    """Pairs whose prompts hold images (:mod:`prefcache.data.vision_pairs`): tokenised by the model's processor,
    each sequence scored with its prompt's images; one cache row a pair, as for text, under an id that covers the
    images. The cache records the processor's fingerprint and settings."""

    def __init__(self, config: PrecomputeConfig, processor):
        super().__init__(config)
        self.processor = processor

    def check(self) -> None:
        if self.config.fsdp:
            raise ValueError("--fsdp is for text models: a vision-language reference runs unsharded (drop --fsdp)")

    def metadata(self) -> dict:
        return processor_record(self.processor)

    def blocks(self, tokenizer, block_rows: int):
        c = self.config
        # Fewer rows a block than text: a block holds its rows' image bytes (Parquet, datasets).
        yield from iter_vision_pair_blocks(c.data, self.processor, c.max_length, c.truncation, c.on_bad_row,
                                           split=c.split, data_config=c.data_config, mapping=RowMapping.of(c),
                                           block_rows=min(block_rows, 4 * VISION_BLOCK_ROWS))


@dataclass(frozen=True)
class KLExample:
    """An unpaired example and its KL completion: the model sees ``item.prompt_ids + item.completion_ids`` and
    ``kl_prompt_ids + kl_completion_ids`` (``item``'s prompt with example ``kl_id``'s completion, truncated as pairs
    are, so under ``keep_end`` its prompt may be cut further than ``item``'s own)."""

    item: TokenizedCompletion
    kl_id: str
    kl_prompt_ids: list[int]
    kl_completion_ids: list[int]

    @property
    def id(self) -> str:
        return self.item.id


class UnpairedKind:
    """Unpaired (KTO) examples: ``prompt + completion`` and ``prompt + KL completion``, one cache row an example.
    Paired data is unpaired as TRL does (:func:`prefcache.data.unpaired.unpair_examples`)."""

    unit = "example"

    def __init__(self, config: PrecomputeConfig):
        self.config = config

    def check(self) -> None:
        if self.config.per_token:
            raise ValueError("--per-token is not supported for unpaired caches")
        check_no_mapping(self.config)

    def metadata(self) -> dict:
        return {"kind": "unpaired", "kl_group_size": self.config.kl_group_size}

    @staticmethod
    def schema():
        return UNPAIRED_CACHE

    def blocks(self, tokenizer, block_rows: int):
        c = self.config
        for items, partners, bad in iter_unpaired_blocks(
                c.data, tokenizer, c.max_length, c.truncation, c.on_bad_row, unpair=True, split=c.split,
                data_config=c.data_config, kl_group_size=c.kl_group_size, block_rows=block_rows):
            by_id = {i.id: i for i in items}  # a block holds whole KL groups: every partner is in it
            yield [KLExample(i, partners[i.id], *kl_sequence(i, by_id[partners[i.id]], c.max_length, c.truncation))
                   for i in items], bad

    @staticmethod
    def sequences(e: KLExample) -> tuple:
        return (e.item.prompt_ids, e.item.completion_ids), (e.kl_prompt_ids, e.kl_completion_ids)

    @staticmethod
    def length(e: KLExample) -> int:
        return max(len(e.item.prompt_ids) + len(e.item.completion_ids), len(e.kl_prompt_ids) + len(e.kl_completion_ids))

    @staticmethod
    def columns(shard: list[KLExample], token_logps: dict) -> dict[str, list]:
        """The :data:`~prefcache.core.schemas.UNPAIRED_CACHE` columns; sums in float64 over the fp32 token values."""
        import numpy as np

        def total(prompt, completion) -> float:
            return float(np.sum(token_logps[(), tuple(prompt + completion)], dtype=np.float64))  # text: no images

        cols = {"id": [e.id for e in shard], "label": [e.item.label for e in shard],
                "logps": [total(e.item.prompt_ids, e.item.completion_ids) for e in shard],
                "kl_id": [e.kl_id for e in shard],
                "kl_logps": [total(e.kl_prompt_ids, e.kl_completion_ids) for e in shard],
                "prompt_tokens": [len(e.item.prompt_ids) for e in shard],
                "completion_tokens": [len(e.item.completion_ids) for e in shard],
                "kl_tokens": [len(e.kl_completion_ids) for e in shard], "truncated": [e.item.truncated for e in shard]}
        return {name: cols[name] for name in UNPAIRED_CACHE.names}

    def summary(self, n_ids: int) -> dict:
        return {"examples_in_data": n_ids, "kl_group_size": self.config.kl_group_size}


def data_ids(meta: dict, data: str, tokenizer, *, split: str | None = None, data_config: str | None = None,
             processor=None) -> tuple[list[str], list]:
    """(the scorable ids of ``data``, its bad rows), tokenised as the cache ``meta`` says, read in blocks;
    ``processor``: a vision-language model's (a cache that records one)."""
    length, truncation = meta["max_length"], meta["truncation"]
    if meta.get("kind") == "unpaired":  # one row per (unpaired) example
        blocks = iter_unpaired_blocks(data, tokenizer, length, truncation, "skip", unpair=True, split=split,
                                      data_config=data_config,
                                      kl_group_size=meta.get("kl_group_size") or DEFAULT_KL_GROUP)
        blocks = ((items, bad) for items, _, bad in blocks)
    else:
        mapping = RowMapping(**(meta.get("data_mapping") or {}))  # the columns/templates it was made with
        read = iter_vision_pair_blocks if processor else iter_pair_blocks
        blocks = read(data, processor or tokenizer, length, truncation, "skip", mapping=mapping, split=split,
                      data_config=data_config)
    ids, bad_rows = [], []
    for items, bad in blocks:
        ids += [i.id for i in items]
        bad_rows += bad
    return ids, bad_rows
