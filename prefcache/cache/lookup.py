"""prefcache.cache.lookup."""

from __future__ import annotations

import os
from collections import Counter

import pyarrow as pa
import torch

from prefcache.cache.store import (
    CacheError,
    read_cache,
    read_metadata,
)
from prefcache.core.schemas import CACHE
from prefcache.data.unpaired import TokenizedCompletion


class UnpairedReference:
    """An unpaired cache's values keyed by example id."""

    COLUMNS = ("logps", "kl_logps", "prompt_tokens", "completion_tokens", "kl_tokens")

    def __init__(self, table, metadata: dict, path: str):
        import torch

        self.metadata, self.path = metadata, path
        self.index = {ident: i for i, ident in enumerate(table.column("id").to_pylist())}
        self.kl_id = table.column("kl_id").to_pylist()
        self.values = {c: torch.tensor(table.column(c).to_numpy(), dtype=torch.float64) for c in self.COLUMNS}

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike) -> UnpairedReference:
        meta = read_metadata(cache_dir)
        if meta.get("kind") != "unpaired":
            raise CacheError(f"{cache_dir} is a cache of pairs; kto and apo_zero_unpaired need an unpaired cache "
                             "(prefcache precompute --unpaired)")
        return cls(read_cache(cache_dir, columns=["id", "kl_id", *cls.COLUMNS]), meta, str(cache_dir))

    def require(self, items: list[TokenizedCompletion], what: str) -> None:
        """Every id cached, with this run's token counts (else the content changed since precompute)."""
        if missing := [i.id for i in items if i.id not in self.index]:
            raise CacheError(f"{len(missing)} of {len(items)} {what} example ids are not in the cache {self.path}, "
                             f"e.g. {', '.join(missing[:5])}. Run `prefcache precompute --unpaired` on this data.")
        wrong = [i.id for i in items if (len(i.prompt_ids), len(i.completion_ids)) != tuple(
            int(self.values[c][self.index[i.id]]) for c in ("prompt_tokens", "completion_tokens"))]
        if wrong:
            raise CacheError(f"{len(wrong)} {what} examples have other token counts than the cache {self.path} "
                             f"records, e.g. {', '.join(wrong[:5])}: re-run precompute into a new cache.")

    def partner(self, ident: str) -> str:
        return self.kl_id[self.index[ident]]

    def lookup(self, ids) -> dict:
        import torch

        rows = torch.tensor([self.index[i] for i in ids], dtype=torch.long)
        return {c: v[rows] for c, v in self.values.items()}


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


def check_reference_values(reference, pairs, what: str) -> None:
    """Refuse a cache with duplicate ids, or with NaN/inf among the reference values these pairs join."""
    n_rows = len(reference.values["chosen_logps"])
    if len(reference.index) != n_rows:
        dupes = [i for i, k in Counter(_ids(reference)).items() if k > 1]
        raise CacheError(f"the cache {reference.path} holds {n_rows - len(reference.index)} duplicate rows "
                         f"(ids such as {', '.join(dupes[:3])}): a copied shard? `prefcache verify "
                         f"{reference.path}` lists them")
    ids = [p.id for p in pairs]
    values = reference.lookup(ids)
    import torch

    bad = []
    for column in ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix"):
        col = values[column]
        rows = (~torch.isfinite(col)).nonzero().flatten().tolist()  # vectorised: a million pairs in ms
        bad += [(ids[i], column, float(col[i])) for i in rows]
    if bad:
        shown = ", ".join(f"{i} ({c} = {v})" for i, c, v in bad[:3])
        raise CacheError(f"the cache {reference.path} holds {len(bad)} non-finite reference values for the "
                         f"{what} pairs, e.g. {shown}: re-run `prefcache precompute` into a new cache")


def _ids(reference) -> list[str]:
    """Every cached id, duplicates included (the index keeps one row per id)."""
    return read_cache(reference.path, columns=["id"]).column("id").to_pylist()
