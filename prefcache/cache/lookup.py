"""A reference cache's values keyed by example id (never by row order), and the checks a run makes before
it trusts them: every id cached, with this run's token counts, once, and with finite values.

Two kinds of cache, one table: :class:`ReferenceTable` (pairs: chosen and rejected) and
:class:`UnpairedReference` (one completion per example, plus its KL completion's value). Both refuse the
other kind's cache, and both are checked by :func:`check_joined` and :func:`check_reference_values`.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import torch

from prefcache.cache.store import CacheError, read_cache, read_metadata
from prefcache.core.schemas import CACHE


class _Table:
    """Numeric columns of a cache as float64 tensors, indexed by id."""

    COLUMNS: tuple[str, ...] = ()
    EXTRA: tuple[str, ...] = ()  # other columns read (not numeric)
    VALUES: tuple[str, ...] = ()  # the log-prob columns that must be finite
    TOKENS: tuple[tuple[str, str], ...] = ()  # (example attribute, cache column) of the token counts
    UNPAIRED = False
    WHAT = "pairs"

    def __init__(self, table, metadata: dict, path: str):
        self.metadata, self.path = metadata, path
        self.index = {ident: i for i, ident in enumerate(table.column("id").to_pylist())}
        self.n_rows = table.num_rows
        self.values = {c: torch.tensor(table.column(c).to_numpy(), dtype=torch.float64) for c in self.COLUMNS}

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike):
        meta = read_metadata(cache_dir)
        if (meta.get("kind") == "unpaired") != cls.UNPAIRED:
            raise CacheError(
                f"{cache_dir} is a cache of pairs; kto and apo_zero_unpaired need an unpaired cache "
                "(prefcache precompute --unpaired)" if cls.UNPAIRED else
                f"{cache_dir} is an unpaired (KTO) cache: pair losses need a cache of pairs "
                "(prefcache precompute without --unpaired); kto and apo_zero_unpaired use this one")
        return cls(read_cache(cache_dir, columns=["id", *cls.EXTRA, *cls.COLUMNS]), meta, str(cache_dir))

    def missing(self, ids) -> list[str]:
        return [i for i in ids if i not in self.index]

    def lookup(self, ids) -> dict[str, torch.Tensor]:
        """Column -> [B] float64 tensor, in the order of ``ids``."""
        rows = torch.tensor([self.index[i] for i in ids], dtype=torch.long)
        return {c: v[rows] for c, v in self.values.items()}


class ReferenceTable(_Table):
    """A cache of pairs: reference log-probs and token counts of each pair's chosen and rejected side."""

    # the cache's numeric columns: log-probs and token counts (not the truncation flags)
    COLUMNS = tuple(f.name for f in CACHE if pa.types.is_floating(f.type) or pa.types.is_integer(f.type))
    VALUES = ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix")
    TOKENS = (("prompt_ids", "prompt_tokens"), ("chosen_ids", "chosen_tokens"), ("rejected_ids", "rejected_tokens"))

    def require(self, ids) -> None:
        """Raise CacheError naming how many ids, and which, the cache lacks."""
        if missing := self.missing(ids):
            raise CacheError(
                f"{len(missing)} of {len(ids)} example ids are not in the cache {self.path}, e.g. "
                + ", ".join(missing[:5]) + ". Run `prefcache precompute` on this data with the same --out to add them."
            )

    def lookup(self, ids) -> dict[str, torch.Tensor]:
        self.require(ids)
        return super().lookup(ids)


class UnpairedReference(_Table):
    """An unpaired cache: each example's reference log-prob, its KL partner's id and the KL completion's value."""

    COLUMNS = ("logps", "kl_logps", "prompt_tokens", "completion_tokens", "kl_tokens")
    EXTRA = ("kl_id",)
    VALUES = ("logps", "kl_logps")
    TOKENS = (("prompt_ids", "prompt_tokens"), ("completion_ids", "completion_tokens"))
    UNPAIRED = True
    WHAT = "examples"

    def __init__(self, table, metadata: dict, path: str):
        super().__init__(table, metadata, path)
        self.kl_id = table.column("kl_id").to_pylist()

    def require(self, items, what: str) -> None:
        """Every id cached, with this run's token counts (else the content changed since precompute)."""
        if missing := self.missing(example_ids(items)):
            raise CacheError(f"{len(missing)} of {len(items)} {what} example ids are not in the cache {self.path}, "
                             f"e.g. {', '.join(missing[:5])}. Run `prefcache precompute --unpaired` on this data.")
        if wrong := _wrong_counts(self, items):
            raise CacheError(f"{len(wrong)} {what} examples have other token counts than the cache {self.path} "
                             f"records, e.g. {', '.join(wrong[:5])}: re-run precompute into a new cache.")

    def partner(self, ident: str) -> str:
        return self.kl_id[self.index[ident]]


def example_ids(examples) -> list[str]:
    """The ids of tokenised examples: a list of them, or a data store's view (its id column, no example built)."""
    return examples.ids() if hasattr(examples, "ids") else [e.id for e in examples]


def _token_counts(examples, attr: str) -> np.ndarray:
    if hasattr(examples, "counts"):  # a data store's view: the list offsets only
        return examples.counts(attr)
    return np.array([len(getattr(e, attr)) for e in examples], dtype=np.int64)


def _wrong_counts(reference: _Table, items) -> list[str]:
    ids = example_ids(items)
    ref = reference.lookup(ids)
    wrong = np.zeros(len(ids), dtype=bool)
    for attr, column in reference.TOKENS:
        wrong |= _token_counts(items, attr) != ref[column].numpy()
    return [ids[k] for k in np.flatnonzero(wrong)]


def check_joined(reference, examples, what: str) -> None:
    """Every id must be cached, and with the token counts this run's tokenisation gives (with an id
    column, other content under a cached id would otherwise be joined to the wrong reference values)."""
    if isinstance(reference, UnpairedReference):
        reference.require(examples, what)
        return
    reference.require(example_ids(examples))  # CacheError: how many ids are missing, and which
    if wrong := _wrong_counts(reference, examples):
        raise CacheError(f"{len(wrong)} of the {what} pairs have other token counts than the cache {reference.path} "
                         f"records, e.g. {', '.join(wrong[:5])}: their content changed since the cache was made. "
                         "Re-run `prefcache precompute` on this data into a new cache.")


def check_reference_values(reference, examples, what: str) -> None:
    """Refuse a cache with duplicate ids, or with NaN/inf among the reference values these examples join
    (an unpaired example's KL value included)."""
    if len(reference.index) != reference.n_rows:
        dupes = [i for i, k in Counter(_ids(reference)).items() if k > 1]
        raise CacheError(f"the cache {reference.path} holds {reference.n_rows - len(reference.index)} duplicate rows "
                         f"(ids such as {', '.join(dupes[:3])}): a copied shard? `prefcache verify "
                         f"{reference.path}` lists them")
    ids = example_ids(examples)
    values = reference.lookup(ids)
    bad = []
    for column in reference.VALUES:
        col = values[column]
        rows = (~torch.isfinite(col)).nonzero().flatten().tolist()  # vectorised: a million pairs in ms
        bad += [(ids[i], column, float(col[i])) for i in rows]
    if bad:
        shown = ", ".join(f"{i} ({c} = {v})" for i, c, v in bad[:3])
        raise CacheError(f"the cache {reference.path} holds {len(bad)} non-finite reference values for the "
                         f"{what} {reference.WHAT}, e.g. {shown}: re-run `prefcache precompute` into a new cache")


def _ids(reference) -> list[str]:
    """Every cached id, duplicates included (the index keeps one row per id)."""
    return read_cache(reference.path, columns=["id"]).column("id").to_pylist()
