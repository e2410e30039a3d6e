"""Tokenised examples as a lazy view over an Arrow table (a memory-mapped data store, :mod:`prefcache.data.store`).

A million pairs of 600 tokens as Python lists cost ~20 GB (a list slot and an int object per token, ~36 bytes);
in the store's ``large_list<int32>`` columns they cost 4 bytes a token, in pages the kernel maps in on demand and
may drop again. :class:`TokenRows` holds the table and, for a subset, a numpy array of row numbers: no Python
object per example. Indexing it builds the one example asked for (a
:class:`~prefcache.data.tokens.TokenizedPair` or :class:`~prefcache.data.unpaired.TokenizedCompletion`), so the
code that collates a batch reads the same objects as before, made only for the rows of the batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import fields

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class TokenRows(Sequence):
    """Examples of ``make``'s type (a dataclass whose fields are columns of ``table``) read row by row.

    ``rows``: the table's rows this view holds, in order (None: all of them). ``view[i]`` is one example;
    ``view[a:b:c]`` and :meth:`take` are views again. :meth:`ids`, :meth:`counts` and :meth:`lengths` read whole
    columns without building examples.
    """

    def __init__(self, table: pa.Table, make: type, rows: np.ndarray | None = None, path: str | None = None):
        self.table, self.make, self.path = table, make, path  # path: the store file the table is mapped from
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._tokens = table.select([f.name for f in fields(make)])  # the columns an example is built from

    def __len__(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} of {n}")
        i = i + n if i < 0 else i
        row = int(self.rows[i]) if self.rows is not None else i
        return self.make(**self._tokens.slice(row, 1).to_pylist()[0])

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} {self.make.__name__} of {self.table.num_rows}, {self.path})"

    def take(self, positions) -> TokenRows:
        """The view of these positions (of this view), in their order."""
        positions = np.asarray(positions, dtype=np.int64)
        return TokenRows(self.table, self.make, positions if self.rows is None else self.rows[positions], self.path)

    def where(self, mask: np.ndarray) -> TokenRows:
        return self.take(np.flatnonzero(mask))

    def full(self) -> TokenRows:
        """Every row of the table, in table order."""
        return self if self.rows is None else TokenRows(self.table, self.make, None, self.path)

    def values(self, column: pa.ChunkedArray) -> pa.ChunkedArray | pa.Array:
        """A column of the table (or one computed from it, row for row) restricted to this view's rows."""
        return column if self.rows is None else column.take(pa.array(self.rows))

    def ids(self) -> list[str]:
        return self.values(self.table.column("id")).to_pylist()

    def counts(self, name: str) -> np.ndarray:
        """Tokens in the list column ``name`` (e.g. ``chosen_ids``) of each example: its offsets only are read."""
        return _numpy(self.values(pc.list_value_length(self.table.column(name))))

    def lengths(self) -> np.ndarray:
        """Tokens of each example in all, the key of length-grouped batches."""
        return self.column("tokens")

    def column(self, name: str) -> np.ndarray:
        """A scalar column (``tokens``, ``label``, ``row``) of this view's examples, as numpy."""
        return _numpy(self.values(self.table.column(name)))

    def isin(self, ids) -> np.ndarray:
        """Whether each example's id is one of ``ids``."""
        found = pc.is_in(self.values(self.table.column("id")), value_set=pa.array(sorted(ids), pa.string()))
        return _numpy(found)


def _numpy(column) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    return column.to_numpy(zero_copy_only=False)


class IdIndex:
    """id -> example over whole data stores, as a dict of them would be, without a Python string per id: each
    store's ids are sorted once (an int64 per row) and found by binary search in the mapped ``id`` column."""

    def __init__(self, views: list[TokenRows]):
        tables: dict[int, TokenRows] = {}
        for v in views:  # a held-out share and the training rows of one store are one store
            tables.setdefault(id(v.table), v.full())
        self.views = list(tables.values())
        self._ids = [v.table.column("id") for v in self.views]
        self._order = [pc.sort_indices(ids).to_numpy() for ids in self._ids]

    def find(self, ident: str):
        """The example with this id, or None."""
        for view, ids, order in zip(self.views, self._ids, self._order, strict=True):
            k = bisect.bisect_left(range(len(order)), ident, key=lambda j: ids[int(order[j])].as_py())
            if k < len(order) and ids[int(order[k])].as_py() == ident:
                return view[int(order[k])]
        return None

    def __getitem__(self, ident: str):
        if (item := self.find(ident)) is None:
            raise KeyError(ident)
        return item

    def missing(self, ids: list[str]) -> list[str]:
        """The ``ids`` no store holds, in their order (one vectorised pass, not a search per id)."""
        if not ids:
            return []
        known = pa.chunked_array([c for ids in self._ids for c in ids.chunks], pa.string())
        found = pc.is_in(pa.array(ids, pa.string()), value_set=known.combine_chunks()).to_numpy(zero_copy_only=False)
        return [ids[i] for i in np.flatnonzero(~found)]
