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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from prefcache.data.columns import RowMapping
from prefcache.data.formats import DataFormatError, load_rows
from prefcache.data.pairs import (
    BadRow,
    Example,
    _apply_policy,
    _Bad,
    _canonical,
    _render,
    _truncate,
    prepare_examples,
    tokenize_examples,
)

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
        if not unpair:
            raise DataFormatError("this is not unpaired data (prompt, completion, boolean label): pass unpair=True "
                                  "(--unpair) to turn prompt/chosen/rejected pairs into unpaired examples")
        pairs, bad = prepare_examples(rows, tokenizer, on_bad_row)
        out = []
        for start in range(0, len(pairs), UNPAIR_BLOCK):  # TRL: per map block, chosens then rejecteds
            block = pairs[start : start + UNPAIR_BLOCK]
            for label, side in ((True, "chosen"), (False, "rejected")):
                out += [UnpairedExample(f"{p.id}-{side}", p.row, p.prompt, getattr(p, side), label, p.conversational)
                        for p in block]
        return out, bad
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
    _apply_policy(bad, on_bad_row)
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
    ``data_config`` as for pairs). Returns (items, bad rows, examples), aligned one to one."""
    rows = load_rows(path, split, data_config)
    examples, bad = prepare_unpaired(rows, tokenizer, "skip", unpair)
    items, bad_tokens = tokenize_unpaired(examples, tokenizer, max_length, truncation, "skip")
    bad = sorted(bad + bad_tokens, key=lambda b: b.row)
    _apply_policy(bad, on_bad_row, str(path))
    kept = {i.id for i in items}
    return items, bad, [e for e in examples if e.id in kept]


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
        raise ValueError("--columns and the --*-template options are not supported for unpaired data yet: give "
                         "the data prompt, completion and label columns")






