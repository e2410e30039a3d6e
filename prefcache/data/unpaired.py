"""Unpaired preference data (TRL's KTO format) and its reference cache, with KL completions.

Format (TRL's "unpaired preference"): ``prompt``, ``completion`` and a boolean ``label`` (True =
desirable), standard (strings) or conversational (message lists), rendered and tokenised exactly as
pairs are (:mod:`prefcache.data.pairs`: EOS appended to standard completions, chat template otherwise, the
joint tokenisation, keep_start truncation, prompts of ``>= max_length`` tokens are bad rows).
Paired data is unpaired on request as TRL's ``unpair_preference_dataset`` does: per block of 1000
pairs, the chosen completions (label True), then the rejected ones (label False).

KL completions: KTO's reference point z is estimated from *mismatched* (prompt, completion) pairs. As
TRL's KTOTrainer builds them, the examples are taken in data order in groups of ``kl_group_size`` (TRL's
per-device batch size) and each prompt is given the previous example's completion, the first the last
one's: (x1, yn), (x2, y1), ..., (xn, yn-1). The cache stores, per example id, the reference log-prob of
its own completion (``logps``), the id of the example whose completion is its KL completion (``kl_id``)
and the reference log-prob of that mismatched sequence (``kl_logps``). The trainer rebuilds the same KL
sequences from ``kl_id``, so nothing depends on row order at training time.

Read in blocks (:func:`iter_tokenized_unpaired`: the trainer's data store, with the rendered texts;
:func:`iter_unpaired_blocks`: the reference pass, with KL partners) or whole (:func:`load_unpaired`: the
definition the blocks are held to, and a Python API): all give the same items in the same order and so the
same KL partners.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from prefcache.data.badrows import BadRow, _apply_policy, _Bad, _check_policy
from prefcache.data.columns import UNPAIRED_NOT_YET, RowMapping
from prefcache.data.formats import DataFormatError, load_rows
from prefcache.data.pairs import BLOCK_ROWS, iter_example_blocks, with_lines
from prefcache.data.tokens import _truncate, tokenize_examples
from prefcache.data.validate import Example, _canonical, _render, prepare_examples, refuse_images

UNPAIR_BLOCK = 1000  # datasets.map's default batch size: the block TRL's unpairing works in
DEFAULT_KL_GROUP = 8  # TRL's default per_device_train_batch_size


@dataclass(frozen=True)
class UnpairedExample:
    """One rendered (prompt, completion, label) example."""

    id: str
    row: int
    prompt: str
    completion: str
    label: bool
    conversational: bool = False


@dataclass(frozen=True)
class TokenizedCompletion:
    """Token ids of one example: the model sees ``prompt_ids + completion_ids`` (at most max_length)."""

    id: str
    label: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool


def is_unpaired(rows: list) -> bool:
    """True for TRL's unpaired format (a ``completion`` and a ``label`` column, no chosen/rejected)."""
    dicts = [r for r in rows[:100] if isinstance(r, dict)]
    return bool(dicts) and all("completion" in r and "label" in r and "chosen" not in r for r in dicts)


def unpaired_id(prompt, completion, label: bool) -> str:
    """Content hash of the raw fields, as :func:`prefcache.data.pairs.example_id` for pairs."""
    key = json.dumps({"prompt": _canonical(prompt), "completion": _canonical(completion), "label": bool(label)},
                     sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def prepare_unpaired(rows: list[dict], tokenizer, on_bad_row: str = "fail",
                     unpair: bool = False) -> tuple[list[UnpairedExample], list[BadRow]]:
    """Validate and render unpaired rows; paired rows (prompt/chosen/rejected) need ``unpair=True``.

    Ids: the ``id`` column (for paired data: the pair's id + ``-chosen`` / ``-rejected``), else a content hash.
    """
    if not is_unpaired(rows):
        check_unpair(unpair)
        pairs, bad = prepare_examples(rows, tokenizer, on_bad_row)
        return unpair_examples(pairs), bad
    examples, bad = prepare_unpaired_rows(rows, tokenizer)
    _apply_policy(bad, on_bad_row)
    return examples, bad


def check_unpair(unpair: bool) -> None:
    if not unpair:
        raise DataFormatError("this is not unpaired data (prompt, completion, boolean label): pass unpair=True "
                              "(--unpair) to turn prompt/chosen/rejected pairs into unpaired examples")


def unpair_examples(pairs: list[Example]) -> list[UnpairedExample]:
    """TRL's ``unpair_preference_dataset``: per block of :data:`UNPAIR_BLOCK` pairs (a ``datasets.map`` batch), the
    chosen completions (label True), then the rejected ones (label False)."""
    out = []
    for start in range(0, len(pairs), UNPAIR_BLOCK):
        block = pairs[start : start + UNPAIR_BLOCK]
        for label, side in ((True, "chosen"), (False, "rejected")):
            out += [UnpairedExample(f"{p.id}-{side}", p.row, p.prompt, getattr(p, side), label, p.conversational)
                    for p in block]
    return out


def prepare_unpaired_rows(rows: list[dict], tokenizer) -> tuple[list[UnpairedExample], list[BadRow]]:
    """Rows in the unpaired format -> (examples in row order, bad rows); exact duplicates yield one example."""
    refuse_images(rows, tokenizer)
    has_id = any(isinstance(r, dict) and "id" in r for r in rows)
    examples, bad, seen = [], [], {}
    for i, row in enumerate(rows):
        ex_id = None
        try:
            if not isinstance(row, dict):
                raise _Bad(f"a row must be an object with prompt/completion/label, got a {type(row).__name__}")
            for name in ("prompt", "completion", "label"):
                if row.get(name) is None:
                    raise _Bad(f"{'null' if name in row else 'missing'} field '{name}'")
            if not isinstance(row["label"], bool):
                raise _Bad(f"'label' must be a boolean (True = desirable), got {type(row['label']).__name__}")
            ex_id = str(row["id"]) if has_id and row.get("id") not in (None, "") else None
            if has_id and ex_id is None:
                raise _Bad("'id' is missing or null (the file has an id column, so every row needs one)")
            ex_id = ex_id or unpaired_id(row["prompt"], row["completion"], row["label"])
            content = unpaired_id(row["prompt"], row["completion"], row["label"])
            if ex_id in seen:
                if seen[ex_id][1] == content:
                    continue  # an exact duplicate
                raise _Bad(f"id {ex_id!r} is already used by row {seen[ex_id][0]} for different content")
            # The pair renderer with the completion on both sides: one code path for templates and EOS.
            prompt, completion, _, chat = _render({"prompt": row["prompt"], "chosen": row["completion"],
                                                   "rejected": row["completion"]}, tokenizer)
            seen[ex_id] = (i, content)
            examples.append(UnpairedExample(ex_id, i, prompt, completion, row["label"], chat))
        except _Bad as e:
            bad.append(BadRow(i, ex_id, str(e)))
    return examples, bad


def tokenize_unpaired(examples: list[UnpairedExample], tokenizer, max_length: int, truncation: str = "keep_start",
                      on_bad_row: str = "fail") -> tuple[list[TokenizedCompletion], list[BadRow]]:
    """TRL's joint tokenisation and truncation (:func:`prefcache.data.pairs.tokenize_examples`, one completion)."""
    as_pairs = [Example(e.id, e.row, e.prompt, e.completion, e.completion, e.conversational) for e in examples]
    pairs, bad = tokenize_examples(as_pairs, tokenizer, max_length, truncation, on_bad_row)
    label = {e.id: e.label for e in examples}
    return [TokenizedCompletion(p.id, label[p.id], p.prompt_ids, p.chosen_ids, p.chosen_truncated) for p in pairs], bad


def load_unpaired(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                  on_bad_row: str = "fail", *, unpair: bool = False, split: str | None = None,
                  data_config: str | None = None):
    """Load, validate and tokenise unpaired data (a file, a datasets folder or a Hub dataset: ``split``,
    ``data_config`` as for pairs). Returns (items, bad rows, examples), aligned one to one.

    Whole: every row, example and token list in memory at once. No command reads this way (they read in
    blocks, :func:`iter_tokenized_unpaired`); it states TRL's whole-data unpairing in a few lines, the read the
    blocks are tested against, as :func:`~prefcache.data.pairs.load_dataset_pairs` is for pairs."""
    rows = load_rows(path, split, data_config)
    examples, bad = prepare_unpaired(rows, tokenizer, "skip", unpair)
    items, bad_tokens = tokenize_unpaired(examples, tokenizer, max_length, truncation, "skip")
    lines = getattr(rows, "lines", None)  # JSONL / CSV: bad rows are reported by line
    bad = with_lines(sorted(bad + bad_tokens, key=lambda b: b.row), lines)
    _apply_policy(bad, on_bad_row, str(path))
    kept = {i.id for i in items}
    return items, bad, [e for e in examples if e.id in kept]


def iter_unpaired_blocks(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                         on_bad_row: str = "fail", *, unpair: bool = False, split: str | None = None,
                         data_config: str | None = None, kl_group_size: int = DEFAULT_KL_GROUP,
                         block_rows: int = BLOCK_ROWS):
    """:func:`load_unpaired` in blocks of about ``block_rows`` rows (bounded memory): yields (items, partners,
    bad rows), ``items`` whole KL groups and ``partners`` their :func:`kl_partners`. With ``on_bad_row='fail'``
    the first block holding a bad row raises :class:`~prefcache.data.badrows.BadDataError`."""
    _check_policy(on_bad_row)
    for items, bad, _ in iter_tokenized_unpaired(path, tokenizer, max_length, truncation, unpair=unpair,
                                                 split=split, data_config=data_config, group_size=kl_group_size,
                                                 block_rows=block_rows):
        _apply_policy(bad, on_bad_row, str(path))
        yield items, kl_partners([i.id for i in items], kl_group_size), bad


def iter_tokenized_unpaired(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                            *, unpair: bool = False, split: str | None = None, data_config: str | None = None,
                            group_size: int = 1, block_rows: int = BLOCK_ROWS):
    """(items, bad rows, examples) per block of about ``block_rows`` rows, items and examples aligned one to one
    as :func:`load_unpaired` returns them, ``items`` whole groups of ``group_size`` consecutive items (the KL
    groups; 1: any number) but in the last block; bad rows sorted by row in a block, left to the caller's policy.

    The ids and their order are exactly those of one read: paired data is unpaired per :data:`UNPAIR_BLOCK`
    valid pairs and the groups are ``group_size`` consecutive items, both counted over the whole data, so the
    pairs and items left over at a block's end wait for the next block (at most ``UNPAIR_BLOCK - 1`` pairs and
    ``group_size - 1`` items). A waiting pair's bad rows (a prompt too long) come with the block that unpairs
    it, after rows of its own block: sort the bad rows of all blocks by row for :func:`load_unpaired`'s order.
    The format is decided on the first block. Bad rows carry their row and line numbers in the data.
    """
    unpaired_rows: list[bool] = []  # [is the data in the unpaired format], once the first block is read

    def prepare(rows):
        if not unpaired_rows:
            unpaired_rows.append(is_unpaired(rows))
            if not unpaired_rows[0]:
                check_unpair(unpair)
        return prepare_unpaired_rows(rows, tokenizer) if unpaired_rows[0] else prepare_examples(rows, tokenizer, "skip")

    def content(ex) -> str:  # the rendered texts: of an unpaired example, or of a pair still to unpair
        return "\0".join((ex.prompt, ex.completion, str(ex.label)) if unpaired_rows[0] else
                          (ex.prompt, ex.chosen, ex.rejected))

    waiting: list[tuple[Example, int | None]] = []  # valid pairs not yet unpaired, with their lines
    items: list[TokenizedCompletion] = []  # items not yet in a whole group
    texts: list[UnpairedExample] = []  # their rendered examples, aligned with items

    def tokenized(examples: list[UnpairedExample], lines) -> list[BadRow]:
        new, bad = tokenize_unpaired(examples, tokenizer, max_length, truncation, "skip")
        kept = {i.id for i in new}  # ids are unique over the data (SeenIds): an example's id finds its item
        items.extend(new)
        texts.extend(e for e in examples if e.id in kept)
        return with_lines(bad, lines)

    def unpaired_waiting(n: int) -> list[BadRow]:  # unpair and tokenise the first n waiting pairs
        chunk = waiting[:n]
        del waiting[:n]
        lines = {ex.row: line for ex, line in chunk} if chunk and chunk[0][1] else None
        return tokenized(unpair_examples([ex for ex, _ in chunk]), lines)

    def ready(bad: list[BadRow], n: int):
        out, out_texts = items[:n], texts[:n]
        del items[:n], texts[:n]
        return out, sorted(bad, key=lambda b: b.row), out_texts

    for examples, bad, lines in iter_example_blocks(path, tokenizer, split=split, data_config=data_config,
                                                    block_rows=block_rows, prepare=prepare, content=content):
        bad = with_lines(bad, lines)
        if unpaired_rows[0]:
            bad += tokenized(examples, lines)
        else:
            waiting.extend((ex, lines[ex.row] if lines else None) for ex in examples)
            bad += unpaired_waiting(len(waiting) // UNPAIR_BLOCK * UNPAIR_BLOCK)
        yield ready(bad, len(items) // group_size * group_size)
    bad = unpaired_waiting(len(waiting))
    if items or bad:
        yield ready(bad, len(items))


def kl_partners(ids: list[str], group_size: int) -> dict[str, str]:
    """id -> the id whose completion is its KL completion: TRL's rotation by one within each group of
    ``group_size`` consecutive examples, [y1..yn] -> [yn, y1, ..., yn-1]."""
    partners = {}
    for start in range(0, len(ids), group_size):
        group = ids[start : start + group_size]
        for k, ident in enumerate(group):
            partners[ident] = group[k - 1]
    return partners


def kl_sequence(item: TokenizedCompletion, partner: TokenizedCompletion, max_length: int,
                truncation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of ``item``'s prompt with ``partner``'s completion, truncated as pairs are."""
    prompt, completion, _ = _truncate(item.prompt_ids, partner.completion_ids, partner.completion_ids, max_length,
                                      truncation)
    return prompt, completion


def check_no_mapping(config) -> None:
    """Column mappings and templates (``--columns``, ``--*-template``) are for pairs; refuse them here."""
    if RowMapping.of(config):
        raise ValueError(UNPAIRED_NOT_YET[0].upper() + UNPAIRED_NOT_YET[1:])
