"""The reference cache: a directory of Parquet shards whose file metadata says what made them.

Layout: ``part-r{rank:03d}-{seq:06d}-{nonce}.parquet`` shards (written to a ``.tmp-`` name, then renamed,
so a crash leaves whole shards only; the per-pass nonce means two writers can never overwrite each
other's shards, even without the directory lock of :mod:`prefcache.core.locking`), ``manifest.json`` (a human-readable mirror of the metadata) and,
when rows were skipped, ``bad_rows.jsonl``. Every fact needed to trust the cache lives in the
Parquet key-value metadata under the key ``prefcache``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from prefcache.core.atomic import write_table_atomic, write_text_atomic
from prefcache.core.folders import CACHE_MANIFEST, SHARD_GLOB
from prefcache.core.schemas import cache_schema

SCHEMA_VERSION = 1
META_KEY = b"prefcache"
_SHARD_RE = re.compile(r"part-r(\d{3})-(\d{6})(?:-[0-9a-f]{8})?\.parquet$")  # no nonce: older caches

# What must agree for a cache to be extended, or trusted by a trainer; the rest is provenance.
COMPAT_KEYS = (
    "schema_version", "model_fingerprint", "adapter_fingerprint", "tokenizer_fingerprint",
    "chat_template_hash", "max_length", "truncation", "quantization", "dtype", "per_token", "data_mapping",
    "kind", "kl_group_size",  # unpaired (KTO) caches only; None for caches of pairs
    "processor_fingerprint",  # vision-language models only (prefcache.model.vision.processor_fingerprint)
)
# What the trainer / scorer checks: the tokenisation must be the one it will do itself.
TOKENIZATION_KEYS = ("tokenizer_fingerprint", "chat_template_hash", "max_length", "truncation", "processor_fingerprint")
# Keys a cache of another kind lacks; absent they leave a cache's identity as it was before they existed.
_OPTIONAL_KEYS = ("processor_fingerprint",)


class CacheError(ValueError):
    """A cache that is missing, damaged, or does not match what is asked of it."""


def shard_paths(cache_dir: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(cache_dir).glob(SHARD_GLOB) if _SHARD_RE.search(p.name))


def read_metadata(cache_dir: str | os.PathLike) -> dict:
    """The metadata of a cache (from its first shard; :func:`verify` checks all shards agree)."""
    shards = shard_paths(cache_dir)
    if not shards:
        manifest = Path(cache_dir) / CACHE_MANIFEST
        if manifest.exists():
            return json.loads(manifest.read_text())["metadata"]
        raise CacheError(f"{cache_dir} is not a prefcache cache (no part-r*.parquet shards)")
    return shard_metadata(shards[0])


def shard_metadata(path: Path) -> dict:
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:  # a truncated or overwritten file: name it
        raise CacheError(f"{path}: damaged shard, not readable as Parquet ({e}); `prefcache verify "
                         f"{Path(path).parent}` lists every damaged shard") from None
    if META_KEY not in meta:
        raise CacheError(f"{path} has no prefcache metadata")
    return json.loads(meta[META_KEY])


def differences(have: dict, want: dict, keys=COMPAT_KEYS) -> list[str]:
    """Human-readable lines for each key on which two metadata dicts disagree."""
    lines = []
    for k in keys:
        if have.get(k) == want.get(k):
            continue
        if k == "processor_fingerprint":
            lines += processor_differences(have, want)
        else:
            lines.append(f"{k}: cache has {have.get(k)!r}, asked for {want.get(k)!r}")
    return lines


def processor_differences(have: dict, want: dict) -> list[str]:
    """How the image processors of two metadata dicts differ, setting by setting (a text model has none)."""
    if have.get("processor_fingerprint") is None:
        return ["processor: the cache was made with a text model (no image processor); this run's model is a "
                "vision-language model"]
    if want.get("processor_fingerprint") is None:
        return ["processor: the cache was made with a vision-language model's image processor; this run's model "
                "is a text model"]
    a, b = have.get("processor_settings") or {}, want.get("processor_settings") or {}
    return ([f"processor {k}: cache has {a.get(k)!r}, asked for {b.get(k)!r}"
             for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
            or [f"processor_fingerprint: cache has {have['processor_fingerprint']!r}, asked for "
                f"{want['processor_fingerprint']!r}"])


def identity(meta: dict) -> str:
    """A short hash of what a cache's values are a function of (its :data:`COMPAT_KEYS`: model, tokenisation,
    precision, ...). Two caches with one identity hold the same value for an id they both have, whatever
    else they hold, so a resumed run may read either."""
    keys = [k for k in COMPAT_KEYS if k not in _OPTIONAL_KEYS or meta.get(k) is not None]
    return hashlib.sha256(json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def existing_ids(cache_dir: str | os.PathLike) -> set[str]:
    ids: set[str] = set()
    for path in shard_paths(cache_dir):
        ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
    return ids


def read_cache(cache_dir: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All shards as one table (any Parquet reader can do the same: ``cache/part-r*.parquet``)."""
    shards = shard_paths(cache_dir)
    if not shards:
        raise CacheError(f"{cache_dir} is not a prefcache cache (no part-r*.parquet shards)")
    tables = [pq.read_table(p, columns=columns) for p in shards]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables], promote_options="default")


def remove_temporaries(cache_dir: str | os.PathLike, rank: int = 0) -> None:
    """Half-written files of a killed pass: this rank's shard temps, and rank 0's manifest, bad-rows and
    config temps. Only a pass holding the directory lock calls this (other ranks' temps are left alone)."""
    patterns = [f".tmp-r{rank:03d}-*"] + ([".tmp-manifest-*", ".tmp-bad_rows-*", ".tmp-config-*"] if rank == 0 else [])
    for pattern in patterns:
        for stale in Path(cache_dir).glob(pattern):
            stale.unlink(missing_ok=True)


class CacheWriter:
    """Appends shards for one rank. Each :meth:`write` is one atomic shard file."""

    def __init__(self, cache_dir: str | os.PathLike, metadata: dict, rank: int = 0, table_schema: pa.Schema | None = None):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metadata = metadata
        self.rank = rank
        self.schema = (table_schema or cache_schema(metadata.get("per_token", False))).with_metadata(
            {META_KEY: json.dumps(metadata, sort_keys=True).encode()}
        )
        remove_temporaries(self.dir, rank)
        taken = [int(m.group(2)) for p in shard_paths(self.dir) if (m := _SHARD_RE.search(p.name)) and int(m.group(1)) == rank]
        self.seq = max(taken, default=-1) + 1
        self.nonce = secrets.token_hex(4)  # per pass: shard names of two writers never collide

    def write(self, columns: dict[str, list]) -> Path:
        """One shard, atomically; a write that fails (disk full, read-only) leaves no partial file and
        raises :class:`~prefcache.core.atomic.WriteError` naming the shard and how much was written."""
        table = pa.Table.from_pydict(columns, schema=self.schema)
        final = self.dir / f"part-r{self.rank:03d}-{self.seq:06d}-{self.nonce}.parquet"
        write_table_atomic(table, final, prefix=f".tmp-r{self.rank:03d}-")
        self.seq += 1
        return final

    def write_manifest(self) -> None:
        manifest = {"metadata": self.metadata, "columns": self.schema.names,
                    "note": "mirror for humans; the Parquet metadata is authoritative"}
        write_text_atomic(self.dir / CACHE_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True),
                          prefix=".tmp-manifest-")


def summary(cache_dir: str | os.PathLike) -> dict:
    """Metadata, shard and row counts, and per-column statistics (what ``prefcache inspect`` shows)."""
    import polars as pl

    meta = read_metadata(cache_dir)
    for path in shard_paths(cache_dir):
        shard_metadata(path)  # a damaged footer: CacheError naming the shard, not a polars ComputeError
    df = pl.scan_parquet([str(p) for p in shard_paths(cache_dir)])
    if meta.get("kind") == "unpaired":
        return _unpaired_summary(cache_dir, meta, df)
    numeric = ["chosen_logps", "rejected_logps", "prompt_tokens", "chosen_tokens", "rejected_tokens"]
    stats = df.select(
        [pl.len().alias("rows"), pl.col("id").n_unique().alias("unique_ids")]
        + [pl.col(c).cast(pl.Float64).mean().alias(f"{c}:mean") for c in numeric]
        + [pl.col(c).cast(pl.Float64).std().alias(f"{c}:std") for c in numeric]
        + [pl.col(c).cast(pl.Float64).min().alias(f"{c}:min") for c in numeric]
        + [pl.col(c).cast(pl.Float64).max().alias(f"{c}:max") for c in numeric]
        + [pl.col("chosen_truncated").mean().alias("chosen_truncated:frac"),
           pl.col("rejected_truncated").mean().alias("rejected_truncated:frac"),
           ((pl.col("chosen_logps") - pl.col("rejected_logps")) > 0).mean().alias("ref_prefers_chosen:frac")]
    )
    try:
        stats = stats.collect().row(0, named=True)
    except pl.exceptions.PolarsError as e:  # damaged pages inside a shard: find which
        for path in shard_paths(cache_dir):
            try:
                pq.read_table(path)
            except (OSError, pa.ArrowException) as err:
                raise CacheError(f"{path}: damaged shard ({err}); `prefcache verify {cache_dir}` lists every "
                                 "damaged shard") from None
        raise CacheError(f"{cache_dir}: cannot summarise the cache ({str(e).splitlines()[0]})") from None
    columns = {c: {k: stats[f"{c}:{k}"] for k in ("mean", "std", "min", "max")} for c in numeric}
    return {
        "path": str(cache_dir), "metadata": meta, "shards": len(shard_paths(cache_dir)),
        "rows": stats["rows"], "unique_ids": stats["unique_ids"], "columns": columns,
        "chosen_truncated_frac": stats["chosen_truncated:frac"],
        "rejected_truncated_frac": stats["rejected_truncated:frac"],
        "ref_prefers_chosen_frac": stats["ref_prefers_chosen:frac"],
    }


def _unpaired_summary(cache_dir, meta: dict, df) -> dict:
    """:func:`summary` of an unpaired (KTO) cache: chosen = desirable, rejected = undesirable examples."""
    import polars as pl

    numeric = ["logps", "kl_logps", "prompt_tokens", "completion_tokens", "kl_tokens"]
    stats = df.select(
        [pl.len().alias("rows"), pl.col("id").n_unique().alias("unique_ids"), pl.col("label").mean().alias("desirable")]
        + [getattr(pl.col(c).cast(pl.Float64), k)().alias(f"{c}:{k}") for c in numeric for k in ("mean", "std", "min", "max")]
        + [pl.col("truncated").filter(pl.col("label") == want).mean().alias(f"truncated:{want}") for want in (True, False)]
    ).collect().row(0, named=True)
    return {
        "path": str(cache_dir), "metadata": meta, "shards": len(shard_paths(cache_dir)), "rows": stats["rows"],
        "unique_ids": stats["unique_ids"], "desirable_frac": stats["desirable"],
        "columns": {c: {k: stats[f"{c}:{k}"] for k in ("mean", "std", "min", "max")} for c in numeric},
        "chosen_truncated_frac": stats["truncated:True"], "rejected_truncated_frac": stats["truncated:False"],
        "ref_prefers_chosen_frac": None,
    }


def verify(cache_dir: str | os.PathLike, expected_ids: list[str] | None = None, skipped_ids: set[str] = frozenset()) -> list[str]:
    """Problems found in a cache: unreadable shards, shards whose metadata disagrees, duplicate ids,
    NaN/inf values, and (given ``expected_ids``) ids missing from it. Empty list = healthy."""
    problems: list[str] = []
    shards = shard_paths(cache_dir)
    if not shards:
        return [f"{cache_dir}: no part-r*.parquet shards"]
    first = None
    seen: dict[str, str] = {}
    dupes: list[str] = []
    for path in shards:
        try:
            meta = shard_metadata(path)
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any read failure is a damaged shard, reported by name
            problems.append(f"{path.name}: unreadable ({type(e).__name__}: {e})")
            continue
        if first is None:
            first = meta
        elif diff := differences(first, meta):
            problems.append(f"{path.name}: metadata differs from {shards[0].name}: " + "; ".join(diff))
        if missing := [c for c in cache_schema(meta.get("per_token", False), meta.get("kind")).names
                       if c not in table.column_names]:
            problems.append(f"{path.name}: missing columns {missing}")
            continue
        values = ("logps", "kl_logps") if meta.get("kind") == "unpaired" else ("chosen_logps", "rejected_logps")
        cols = {c: table.column(c).to_pylist() for c in ("id", *values)}
        for i, ident in enumerate(cols["id"]):
            if ident in seen:
                dupes.append(f"{ident} ({seen[ident]} and {path.name})")
            seen[ident] = path.name
            for c in values:
                v = cols[c][i]
                if v is None or math.isnan(v) or math.isinf(v) or v > 1e-6:
                    problems.append(f"{path.name}: id {ident} has {c} = {v} (must be a finite log-prob <= 0)")
    if dupes:
        problems.append(f"{len(dupes)} duplicate ids, e.g. " + ", ".join(dupes[:5]))
    if expected_ids is not None:
        wanted = set(expected_ids) - set(skipped_ids)
        missing = sorted(wanted - seen.keys())
        if missing:
            problems.append(f"{len(missing)} of {len(wanted)} ids of the data are not cached, e.g. " + ", ".join(missing[:5]))
    return problems
