"""Every table prefcache writes, declared once as an Arrow schema.

The writers (``cache.CacheWriter``, ``trainlog.RunLog``, ``evaluation``) build their tables with these
schemas, and the SQL views of :mod:`prefcache.analysis.views` take their columns and types from them, so a
column renamed here is renamed everywhere (a test checks that every writer's table reads back through
its view with no column NULLed). Arrow types exactly: string, not polars' large_string.

    cache     one row per pair: reference log-probs (summed, and LD-DPO prefix sums), token counts
    unpaired  one row per completion of an unpaired (KTO) cache, with its KL completion's value
    steps     one row per logged step and split (train / eval)
    examples  one row per pair and logged step: policy and reference log-probs, rewards, margin
    evals     one row per checkpoint, task and metric (lm-eval and ``prefcache score``)
    pairs     the rendered texts of every example a run sees
    example_images  a vision run's images per example: references (sha256, path), never pixels
    tokens    a data store: each example's token ids, lengths and rendered texts (pairs / unpaired)
"""

from __future__ import annotations

import pyarrow as pa

_F64, _I32, _STR, _BOOL = pa.float64(), pa.int32(), pa.string(), pa.bool_()

CACHE = pa.schema(
    [("id", _STR)]
    + [(c, _F64) for c in ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix")]
    + [(c, _I32) for c in ("prompt_tokens", "chosen_tokens", "rejected_tokens")]
    + [(c, _BOOL) for c in ("chosen_truncated", "rejected_truncated")]
)
# --per-token caches add these (fp32, as the kernel computes them).
CACHE_PER_TOKEN = pa.schema([(c, pa.list_(pa.float32())) for c in ("chosen_token_logps", "rejected_token_logps")])
UNPAIRED_CACHE = pa.schema(
    [("id", _STR), ("label", _BOOL), ("logps", _F64), ("kl_id", _STR), ("kl_logps", _F64)]
    + [(c, _I32) for c in ("prompt_tokens", "completion_tokens", "kl_tokens")] + [("truncated", _BOOL)]
)

STEPS = pa.schema(
    [("step", pa.int64()), ("epoch", _F64), ("split", _STR)]
    + [(c, _F64) for c in ("loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies",
                           "logps_chosen", "logps_rejected", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb",
                           "time_s", "padding_share", "aux_loss", "kl")]  # aux_loss: mixture-of-experts; kl: kto
)
# Where and when a row of ``examples`` was logged; the rest of it is what :func:`example_columns` builds.
EXAMPLE_KEYS = pa.schema([("id", _STR), ("step", pa.int64()), ("split", _STR), ("checkpoint", _STR)])
EXAMPLES = pa.schema(
    list(EXAMPLE_KEYS)
    + [(c, _F64) for c in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                           "reward_chosen", "reward_rejected", "margin")]
    + [(c, _I32) for c in ("prompt_tokens", "chosen_tokens", "rejected_tokens")]
)
# The per-example columns a trainer or scorer computes (no step/split/checkpoint: the log adds those).
EXAMPLE_COLUMNS = ("id", *(n for n in EXAMPLES.names if n not in EXAMPLE_KEYS.names))

EVALS = pa.schema([("checkpoint", _STR), ("step", pa.int64()), ("task", _STR), ("metric", _STR), ("value", _F64),
                   ("stderr", _F64), ("n", pa.int64()), ("time", pa.timestamp("us", tz="UTC")), ("source", _STR)])
PAIRS = pa.schema([(c, _STR) for c in ("id", "prompt", "chosen", "rejected")])
# One row per image of a vision example, in prompt order (position 0, 1, ...): the image's content hash and its
# file (null: an image given as bytes); joins ``examples`` and ``pairs`` on id.
EXAMPLE_IMAGES = pa.schema([("id", _STR), ("position", _I32), ("sha256", _STR), ("path", _STR)])
# A data store (prefcache.data.store): the fields of TokenizedPair / TokenizedCompletion, each example's
# tokens in all (the length grouping's key), its row in the data and its rendered texts (for pairs.parquet).
# large_list / large_string: a million pairs of 600 tokens overflow 32-bit offsets in one column.
_IDS, _TEXT = pa.large_list(pa.int32()), pa.large_string()
_TEXTS = [("row", pa.int64()), ("tokens", _I32), ("prompt", _TEXT), ("conversational", _BOOL)]
TOKEN_PAIRS = pa.schema([("id", _STR), ("prompt_ids", _IDS), ("chosen_ids", _IDS), ("rejected_ids", _IDS),
                         ("chosen_truncated", _BOOL), ("rejected_truncated", _BOOL), *_TEXTS,
                         ("chosen", _TEXT), ("rejected", _TEXT)])
# A vision pair's images (prefcache.data.images.ImageRef): a path, or the encoded bytes when there is no file.
IMAGE_REFS = pa.list_(pa.struct([("sha256", _STR), ("path", _STR), ("data", pa.large_binary())]))
TOKEN_VISION_PAIRS = TOKEN_PAIRS.append(pa.field("images", IMAGE_REFS))
TOKEN_UNPAIRED = pa.schema([("id", _STR), ("label", _BOOL), ("prompt_ids", _IDS), ("completion_ids", _IDS),
                            ("truncated", _BOOL), *_TEXTS, ("completion", _TEXT)])


def cache_schema(per_token: bool = False, kind: str | None = None) -> pa.Schema:
    """The columns of a cache's shards: pairs (with per-token lists under ``per_token``), or unpaired."""
    if kind == "unpaired":
        return UNPAIRED_CACHE
    return pa.schema([*CACHE, *CACHE_PER_TOKEN]) if per_token else CACHE


def example_columns(pairs, policy_chosen, policy_rejected, ref_chosen, ref_rejected, reward_chosen,
                    reward_rejected) -> dict[str, list]:
    """Per-example columns (:data:`EXAMPLE_COLUMNS`) of ``pairs`` (tokenised: their lengths are logged).

    The values are [B] sequences (lists or CPU tensors); the reference ones may be None (a reference-free
    loss), logged as nulls. margin = reward_chosen - reward_rejected.
    """
    values = lambda v: [None] * len(pairs) if v is None else v.tolist() if hasattr(v, "tolist") else list(v)  # noqa: E731
    wc, wr = values(reward_chosen), values(reward_rejected)
    return {"id": [p.id for p in pairs], "policy_chosen_logps": values(policy_chosen),
            "policy_rejected_logps": values(policy_rejected), "ref_chosen_logps": values(ref_chosen),
            "ref_rejected_logps": values(ref_rejected), "reward_chosen": wc, "reward_rejected": wr,
            "margin": [c - r for c, r in zip(wc, wr, strict=True)],
            "prompt_tokens": [len(p.prompt_ids) for p in pairs], "chosen_tokens": [len(p.chosen_ids) for p in pairs],
            "rejected_tokens": [len(p.rejected_ids) for p in pairs]}


_DUCKDB = {pa.string(): "VARCHAR", pa.float64(): "DOUBLE", pa.float32(): "FLOAT", pa.int64(): "BIGINT",
           pa.int32(): "INTEGER", pa.bool_(): "BOOLEAN"}


def duckdb_type(arrow: pa.DataType) -> str:
    """The DuckDB type a Parquet column of this Arrow type reads as."""
    if pa.types.is_list(arrow):
        return duckdb_type(arrow.value_type) + "[]"
    if pa.types.is_timestamp(arrow):
        return "TIMESTAMP WITH TIME ZONE" if arrow.tz else "TIMESTAMP"  # DuckDB spells TIMESTAMPTZ so
    return _DUCKDB[arrow]


def view_columns(schema: pa.Schema) -> list[tuple[str, str]]:
    """[(column, DuckDB type)] of a schema, in its order: the columns of its SQL view."""
    return [(f.name, duckdb_type(f.type)) for f in schema]
