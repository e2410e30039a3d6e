"""Preference pairs in: read, validate, tokenise, whole (:func:`load_dataset_pairs`) or in blocks of rows
(:func:`iter_pair_blocks`, bounded memory).

The steps live in their own modules: :mod:`~prefcache.data.validate` (validate rows, stable ids, render the
texts), :mod:`~prefcache.data.tokens` (TRL's joint tokenisation and truncation) and
:mod:`~prefcache.data.badrows` (bad rows and their policy). Their public names are re-exported here, the one
place other stages import preference data from.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

from prefcache.data.badrows import BadDataError, BadRow, _apply_policy, _check_policy, write_bad_rows
from prefcache.data.formats import DataFormatError, iter_row_blocks, load_rows
from prefcache.data.tokens import TokenizedPair, tokenize_examples
from prefcache.data.validate import Example, example_id, extract_prompt, prepare_examples

__all__ = ["Example", "TokenizedPair", "BadRow", "BadDataError", "DataFormatError", "load_rows", "example_id",
           "extract_prompt", "prepare_examples", "tokenize_examples", "load_dataset_pairs", "write_bad_rows",
           "iter_pair_blocks", "iter_tokenized_blocks", "BLOCK_ROWS", "SeenIds"]

BLOCK_ROWS = 4096  # rows read, validated and tokenised at a time (the precompute stage reads it from here)


def load_dataset_pairs(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                       on_bad_row: str = "fail", *, split: str | None = None, max_rows: int | None = None,
                       ids=None, mapping=None, data_config: str | None = None,
                       ) -> tuple[list[TokenizedPair], list[BadRow], list[Example]]:
    """Load, validate and tokenise a preference data file or Hub dataset (see :func:`load_rows`).

    ``max_rows``: read only the first rows; ``ids``: keep only these example ids; ``mapping``: a
    :class:`~prefcache.data.columns.RowMapping` (column names, prompt templates) applied to each row first;
    ``split`` / ``data_config``: the split and subset of a Hub dataset. Returns (pairs, bad rows,
    examples), pairs and examples aligned one to one (examples that failed tokenisation are left out). With
    ``on_bad_row='fail'`` bad rows of both stages are reported together in one :class:`BadDataError`.
    """
    _check_policy(on_bad_row)
    rows = load_rows(path, split, data_config)
    lines = getattr(rows, "lines", None)  # JSONL / CSV: bad rows are reported by line
    if max_rows is not None:
        rows = rows[:max_rows]
    if mapping:
        mapping.check_columns(column_names(rows), str(path))
        rows = [mapping.apply(r) for r in rows]
    try:
        examples, bad = prepare_examples(rows, tokenizer, "skip")
    except DataFormatError as e:
        raise DataFormatError(f"{path}: {e}") from None
    if ids is not None:
        wanted = set(ids)
        examples = [ex for ex in examples if ex.id in wanted]
    pairs, bad_tokens = tokenize_examples(examples, tokenizer, max_length, truncation, "skip")
    bad = sorted(bad + bad_tokens, key=lambda b: b.row)
    if lines:
        bad = [replace(b, line=lines[b.row]) for b in bad]
    _apply_policy(bad, on_bad_row, str(path))
    dropped = {b.row for b in bad_tokens}
    return pairs, bad, [ex for ex in examples if ex.row not in dropped]


class SeenIds:
    """The ids of earlier blocks, so that reading in blocks drops and refuses what one read would: an exact
    duplicate of an earlier row is dropped, an id reused for other content is a bad row.

    Sorted 64-bit id hashes and, aligned, hashes of the content: 16 bytes an id, in numpy, not on the Python heap
    (a million id strings would cost ~100 bytes each, and pin the memory of every block they were made in).
    Two ids colliding in 64 bits: ~3e-8 for a million ids.
    """

    def __init__(self):
        import numpy as np

        self.keys, self.contents = np.empty(0, np.uint64), np.empty(0, np.uint64)

    def new(self, examples: list, content) -> tuple[list, list[BadRow]]:
        """(``examples`` not seen in an earlier block, bad rows for ids reused for other content); ``content(ex)``
        is the text an example's content hash is made of. Remembers the new ones."""
        import numpy as np

        keys = np.array([_hash64(ex.id) for ex in examples], dtype=np.uint64)
        contents = np.array([_hash64(content(ex)) for ex in examples], dtype=np.uint64)
        pos = np.searchsorted(self.keys, keys).clip(max=max(len(self.keys) - 1, 0))
        hit = (self.keys[pos] == keys) if len(self.keys) else np.zeros(len(keys), bool)
        kept, bad = [], []
        for i, ex in enumerate(examples):
            if not hit[i]:
                kept.append(ex)
            elif self.contents[pos[i]] != contents[i]:  # an exact duplicate of an earlier block's row is dropped
                bad.append(BadRow(ex.row, ex.id, f"id {ex.id!r} is already used by an earlier row for different content"))
        order = np.argsort(merged := np.concatenate([self.keys, keys[~hit]]), kind="stable")
        self.keys, self.contents = merged[order], np.concatenate([self.contents, contents[~hit]])[order]
        return kept, bad


def _pair_content(ex: Example) -> str:
    """What a pair's content hash is made of: its rendered texts."""
    return "\0".join((ex.prompt, ex.chosen, ex.rejected))


def iter_example_blocks(path: str | os.PathLike, tokenizer, *, split: str | None = None,
                        data_config: str | None = None, mapping=None, block_rows: int = BLOCK_ROWS, prepare=None,
                        content=_pair_content):
    """Validated, rendered examples in blocks of ``block_rows`` rows: yields (examples, bad rows, lines) with
    row numbers counted from the start of the data, exact duplicates of earlier blocks dropped (:class:`SeenIds`);
    ``lines`` maps a row number to its 1-based line (JSONL / CSV), else None. ``prepare(rows)`` -> (examples,
    bad rows) validates one block and ``content(example)`` is the text its content hash is made of (defaults: pairs,
    :func:`prepare_examples`)."""
    prepare = prepare or (lambda rows: prepare_examples(rows, tokenizer, "skip"))
    seen = SeenIds()
    for start, rows in iter_row_blocks(path, split, data_config, block_rows):
        block_lines = getattr(rows, "lines", None)  # JSONL / CSV: bad rows are reported by line
        if mapping:
            if start == 0:
                mapping.check_columns(column_names(rows), str(path))
            rows = [mapping.apply(r) for r in rows]
        examples, bad = prepare(rows)
        examples = [replace(ex, row=ex.row + start) for ex in examples]
        kept, reused = seen.new(examples, content)
        bad = [replace(b, row=b.row + start) for b in bad] + reused
        lines = {start + k: line for k, line in enumerate(block_lines)} if block_lines else None
        yield kept, bad, lines


def iter_pair_blocks(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                     on_bad_row: str = "fail", *, split: str | None = None, data_config: str | None = None,
                     mapping=None, block_rows: int = BLOCK_ROWS):
    """:func:`load_dataset_pairs` in blocks of ``block_rows`` rows: yields (pairs, bad rows) per block, so
    memory is bounded by a block, not by the data (a million pairs are never Python objects at once).

    Across blocks only ids are remembered (:class:`SeenIds`). Row numbers count from the start of the data.
    With ``on_bad_row='fail'`` the first block holding a bad row raises :class:`BadDataError`.
    """
    _check_policy(on_bad_row)
    for pairs, bad, _ in iter_tokenized_blocks(path, tokenizer, max_length, truncation, split=split,
                                               data_config=data_config, mapping=mapping, block_rows=block_rows):
        _apply_policy(bad, on_bad_row, str(path))
        yield pairs, bad


def iter_tokenized_blocks(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start", *,
                          split: str | None = None, data_config: str | None = None, mapping=None,
                          block_rows: int = BLOCK_ROWS):
    """(pairs, bad rows, examples) per block of rows, pairs and examples aligned one to one as
    :func:`load_dataset_pairs` returns them; bad rows are left to the caller's policy."""
    for examples, bad, lines in iter_example_blocks(path, tokenizer, split=split, data_config=data_config,
                                                    mapping=mapping, block_rows=block_rows):
        pairs, bad_tokens = tokenize_examples(examples, tokenizer, max_length, truncation, "skip")
        dropped = {b.row for b in bad_tokens}
        yield pairs, with_lines(sorted(bad + bad_tokens, key=lambda b: b.row), lines), \
            [ex for ex in examples if ex.row not in dropped]


def with_lines(bad: list[BadRow], lines: dict[int, int] | list[int] | None) -> list[BadRow]:
    """Bad rows with their 1-based line (``lines[row]``) added, where the data is line-based."""
    return [replace(b, line=lines[b.row]) for b in bad] if lines else bad


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def column_names(rows) -> list[str]:
    names: dict[str, None] = {}
    for row in rows[:1000]:
        if isinstance(row, dict):
            names.update(dict.fromkeys(row))
    return list(names)
