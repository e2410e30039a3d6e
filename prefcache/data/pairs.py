"""Preference data: validate rows, give each a stable id, render and tokenise them as TRL's DPOTrainer does.

Formats (TRL's names):
- *standard*: ``prompt``, ``chosen``, ``rejected`` strings. No chat template; the tokenizer's EOS is
  appended to each completion as text unless it already ends with it.
- *conversational*: lists of ``{"role", "content"}`` messages. The chat template renders the prompt
  (``add_generation_prompt=True``) and prompt + completion; the completion text is what the latter
  adds to the former. No EOS is appended (the template closes the turn).
- *implicit prompt*: no ``prompt`` column; ``chosen``/``rejected`` are whole texts or conversations and
  their common prefix is the prompt, found as ``trl.extract_prompt`` finds it.

Tokenisation is TRL's joint one (see :func:`tokenize_examples`), so a user's numbers agree with TRL's.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace

from prefcache.core.atomic import write_text_atomic
from prefcache.data.formats import DataFormatError, iter_row_blocks, load_rows
from prefcache.data.options import BAD_ROW_POLICIES, TRUNCATIONS

__all__ = ["Example", "TokenizedPair", "BadRow", "BadDataError", "DataFormatError", "load_rows", "example_id",
           "extract_prompt", "prepare_examples", "tokenize_examples", "load_dataset_pairs", "write_bad_rows",
           "iter_pair_blocks"]

SHOWN_BAD_ROWS = 10


@dataclass(frozen=True)
class Example:
    """One validated preference pair, its texts rendered (chat template applied, EOS appended)."""

    id: str  # the ``id`` column as a string, else a content hash (32 hex chars)
    row: int  # 0-based row index in the source file
    prompt: str
    chosen: str
    rejected: str
    conversational: bool = False  # rendered by a chat template: tokenised without adding special tokens


@dataclass(frozen=True)
class TokenizedPair:
    """Token ids of one pair. The model sees ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids``,
    each at most ``max_length`` long; ``*_truncated``: that side's untruncated sequence was longer."""

    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_truncated: bool
    rejected_truncated: bool


@dataclass(frozen=True)
class BadRow:
    row: int  # 0-based row index in the source file
    id: str | None
    problem: str
    line: int | None = None  # 1-based line of a line-based file (JSONL, CSV), when known

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else f"row {self.row + 1}"  # people count from 1
        return f"{where}{f' (id {self.id})' if self.id else ''}: {self.problem}"


class BadDataError(ValueError):
    """Rows that cannot be used, with ``on_bad_row='fail'``. ``bad_rows`` holds all of them."""

    def __init__(self, bad_rows: list[BadRow], source: str = "the data"):
        self.bad_rows = bad_rows
        shown = "\n".join(f"  {b}" for b in bad_rows[:SHOWN_BAD_ROWS])
        more = f"\n  ... and {len(bad_rows) - SHOWN_BAD_ROWS} more" if len(bad_rows) > SHOWN_BAD_ROWS else ""
        super().__init__(
            f"{len(bad_rows)} bad row{'s' if len(bad_rows) != 1 else ''} in {source}:\n{shown}{more}\n"
            "Fix them, or pass on_bad_row='skip' (CLI: --on-bad-row skip) to leave them out "
            "and list them in bad_rows.jsonl."
        )


class _Bad(Exception):
    """Internal: a row's problem, raised where it is found."""


def _canonical(value):
    """Message dicts without their None-valued keys: Parquet and ``datasets`` store messages as structs
    and fill absent keys with None, and chat templates treat the two alike, so the ids must too."""
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items() if v is not None}
    return value


def _content_key(prompt, chosen, rejected) -> str:
    fields = {"prompt": _canonical(prompt), "chosen": _canonical(chosen), "rejected": _canonical(rejected)}
    return json.dumps(fields, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)


def example_id(prompt, chosen, rejected) -> str:
    """Content hash of the raw fields (``prompt`` None when implicit): sha256 of their canonical JSON,
    first 32 hex chars. The same content gets the same id on any machine, in any row order, any format."""
    return _hash(_content_key(prompt, chosen, rejected))


def _hash(content_key: str) -> str:
    return hashlib.sha256(content_key.encode("utf-8")).hexdigest()[:32]


def extract_prompt(chosen, rejected):
    """``trl.extract_prompt``: the common prefix of two strings or two message lists is the prompt.

    As in TRL, a space just before the first difference goes to the completions, and when one side is a
    prefix of the other the prompt stops one element short of it. Unlike TRL, a difference at index 0
    gives an empty prompt (TRL looks at ``chosen[-1]`` there). Returns (prompt, chosen, rejected).
    """
    n = min(len(chosen), len(rejected))
    idx = n - 1
    for i in range(n):
        if chosen[i] != rejected[i]:
            idx = i - 1 if i > 0 and chosen[i - 1] == " " else i
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _check_messages(name: str, value) -> None:
    if not value:
        raise _Bad(f"'{name}' is an empty message list")
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _Bad(f"'{name}' message {k} is a {type(msg).__name__}, not a {{role, content}} object")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                got = "missing" if msg.get(key) is None else f"a {type(msg[key]).__name__}"
                raise _Bad(f"'{name}' message {k}: '{key}' must be a string, got {got}")


def _render(fields: dict, tokenizer) -> tuple[str, str, str, bool]:
    """Validated raw fields -> (prompt, chosen, rejected) texts and whether a chat template made them."""
    for name, value in fields.items():
        if not isinstance(value, (str, list)):
            raise _Bad(f"'{name}' must be a string or a list of {{role, content}} messages, "
                       f"got {type(value).__name__}")
    kinds = {type(v) for v in fields.values()}
    if len(kinds) > 1:
        raise _Bad("fields mix plain strings and message lists (" +
                   ", ".join(f"{k}: {type(v).__name__}" for k, v in fields.items()) + ")")
    for name in ("chosen", "rejected"):
        if not fields[name]:
            raise _Bad(f"empty completion '{name}'")
    if kinds == {str}:
        prompt, chosen, rejected = fields.get("prompt"), fields["chosen"], fields["rejected"]
        if prompt is None:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        eos = tokenizer.eos_token
        if eos is None:
            raise _Bad("standard-format row, but the tokenizer has no EOS token to end the completions with")
        return prompt, *(c if c.endswith(eos) else c + eos for c in (chosen, rejected)), False

    fields = {k: _canonical(v) for k, v in fields.items()}
    for name, value in fields.items():
        _check_messages(name, value)
    if not getattr(tokenizer, "chat_template", None):
        raise _Bad("conversational row, but the tokenizer has no chat template")
    prompt, chosen, rejected = fields.get("prompt"), fields["chosen"], fields["rejected"]
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise _Bad("chosen and rejected share no leading message, so there is no implicit prompt")
    try:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = []
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
            if not full.startswith(prompt_text):
                raise _Bad(f"the chat template's rendering of prompt + {name} does not start with its "
                           "rendering of the prompt (TRL cannot split such a template either)")
            if len(full) == len(prompt_text):
                raise _Bad(f"empty completion '{name}' after applying the chat template")
            texts.append(full[len(prompt_text):])
    except _Bad:
        raise
    except Exception as e:  # jinja errors such as "roles must alternate"
        raise _Bad(f"the chat template failed: {type(e).__name__}: {e}") from e
    return prompt_text, texts[0], texts[1], True


def _prompt_copied_into_conversations(raw: dict) -> bool:
    """A text prompt beside chosen/rejected conversations that open with the same message: the prompt is a copy
    of that message (``HuggingFaceH4/ultrafeedback_binarized``), and TRL takes the implicit prompt instead."""
    c, r = raw.get("chosen"), raw.get("rejected")
    return (isinstance(raw.get("prompt"), str) and isinstance(c, list) and isinstance(r, list) and bool(c) and bool(r)
            and _canonical(c[0]) == _canonical(r[0]))


def prepare_examples(rows: list[dict], tokenizer, on_bad_row: str = "fail") -> tuple[list[Example], list[BadRow]]:
    """Validate rows, give each its id and render its texts.

    Exact duplicates (same id, same content) yield one Example, the first; a later row reusing an id for
    different content is a bad row. Returns (examples in row order, bad rows); with ``on_bad_row='fail'``
    any bad row raises :class:`BadDataError` instead.
    """
    _check_policy(on_bad_row)
    dicts = [r for r in rows if isinstance(r, dict)]
    if dicts and not any("chosen" in r or "rejected" in r for r in dicts):
        raise DataFormatError("no 'chosen' or 'rejected' column: preference data needs prompt/chosen/rejected "
                              f"(TRL's standard or conversational format); found columns {sorted(dicts[0])}")
    implicit = not any("prompt" in r for r in dicts)
    has_id = any("id" in r for r in dicts)
    names = ("chosen", "rejected") if implicit else ("prompt", "chosen", "rejected")
    examples, bad = [], []
    seen: dict[str, tuple[int, str]] = {}  # id -> (first row, content key)
    for i, row in enumerate(rows):
        ex_id = None
        try:
            if not isinstance(row, dict):
                raise _Bad(f"a row must be an object with prompt/chosen/rejected, got a {type(row).__name__}")
            raw = {name: row.get(name) for name in names}
            if _prompt_copied_into_conversations(raw):
                del raw["prompt"]  # TRL's maybe_extract_prompt does the same: the prompt is implicit
            content = _content_key(raw.get("prompt"), raw["chosen"], raw["rejected"])
            if has_id:
                if row.get("id") is None or row["id"] == "":
                    raise _Bad("'id' is missing or null (the file has an id column, so every row needs one)")
                ex_id = str(row["id"])
            else:
                ex_id = _hash(content)
            for name in names:
                if row.get(name) is None:
                    raise _Bad(f"{'null' if name in row else 'missing'} field '{name}'")
            if ex_id in seen:
                first, first_content = seen[ex_id]
                if first_content == content:
                    continue  # an exact duplicate: scored once, under one id
                raise _Bad(f"id {ex_id!r} is already used by row {first + 1} for different content")
            prompt, chosen, rejected, chat = _render(raw, tokenizer)
            # Every row of a file in one format: standard and conversational rows render differently
            # (chat template or not, EOS or not), so a row in the other format is a mistake.
            if examples and chat != examples[0].conversational:
                kinds = {True: "conversational", False: "standard"}
                raise _Bad(f"a {kinds[chat]} row in a file of {kinds[not chat]} rows (row {examples[0].row + 1} "
                           "is one): every row of a file must be in the same format")
            seen[ex_id] = (i, content)
            examples.append(Example(ex_id, i, prompt, chosen, rejected, chat))
        except _Bad as e:
            bad.append(BadRow(i, ex_id, str(e)))
    _apply_policy(bad, on_bad_row)
    return examples, bad


def _common_prefix(a: list[int], b: list[int]) -> int:
    if a == b[: len(a)]:
        return len(a)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, truncation: str):
    """Cut one pair to ``max_length`` tokens per sequence, keeping a single shared prompt."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected
    if truncation == "keep_end":
        # The prompt loses its head, only as far as the longer completion needs, but keeps at least
        # half the window (or all of itself when shorter): a completion scored with no context is noise.
        kept = max(max_length - longest, min(len(prompt), max_length // 2))
        prompt = prompt[len(prompt) - kept :]
    room = max_length - len(prompt)  # >= 1: keep_start prompts are < max_length, keep_end's are cut above
    return prompt, chosen[:room], rejected[:room]


def tokenize_examples(examples: list[Example], tokenizer, max_length: int, truncation: str = "keep_start",
                      on_bad_row: str = "fail") -> tuple[list[TokenizedPair], list[BadRow]]:
    """Tokenise pairs as TRL's DPOTrainer does, then truncate.

    ``prompt_ids = tok(prompt)``, ``full = tok(prompt + completion)`` (the tokenizer's defaults for
    standard text; for chat-rendered text no special tokens are added, as ``apply_chat_template``
    tokenises, since the template already wrote them). BPE can merge across the boundary, so the prompt
    part is the common prefix of ``prompt_ids`` and ``full``, the shorter over chosen and rejected; the
    rest of each ``full`` is the completion. So ``prompt_ids + chosen_ids`` is exactly ``tok(prompt + chosen)``.

    Truncation, per sequence of at most ``max_length`` tokens:
    - ``keep_start`` (TRL's default, matched exactly): keep the first ``max_length`` tokens; the prompt is
      never cut, a long completion loses its tail (EOS included). A prompt of ``>= max_length`` tokens
      leaves no room for a completion: a bad row.
    - ``keep_end``: the prompt loses its *head* instead, just enough for the longer completion to fit,
      so both sides keep one shared prompt (TRL cuts each sequence on its own, which gives chosen and
      rejected different prompts). The prompt keeps at least ``min(its length, max_length // 2)``
      tokens; a completion that still does not fit loses its tail, so each sequence stays one contiguous
      text. Long prompts are therefore not bad rows here. This is TRL 0.x's keep_end with
      ``max_prompt_length = max_length // 2``, cutting the prompt only as far as needed.
    ``*_truncated`` is True when that side's untruncated prompt + completion exceeded ``max_length`` (under
    keep_end the shorter side may lose prompt tokens to the longer one without being flagged).
    """
    _check_policy(on_bad_row)
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a completion token), got {max_length}")
    ids: list[tuple[list[int], list[int], list[int]] | None] = [None] * len(examples)
    for chat in (False, True):
        idx = [i for i, ex in enumerate(examples) if ex.conversational == chat]
        if not idx:
            continue
        texts = [examples[i].prompt for i in idx]
        texts += [examples[i].prompt + examples[i].chosen for i in idx]
        texts += [examples[i].prompt + examples[i].rejected for i in idx]
        # One batched call: the fast tokenizer encodes the batch in Rust, ~100x a per-row loop.
        enc = tokenizer(texts, add_special_tokens=not chat, verbose=False)["input_ids"]
        n = len(idx)
        for k, i in enumerate(idx):
            ids[i] = (enc[k], enc[n + k], enc[2 * n + k])
    pairs, bad = [], []
    for ex, (prompt_ids, full_c, full_r) in zip(examples, ids, strict=True):
        p = min(_common_prefix(prompt_ids, full_c), _common_prefix(prompt_ids, full_r))
        chosen, rejected = full_c[p:], full_r[p:]
        problem = None
        if p == 0:
            problem = "the prompt has no tokens of its own (it is empty, or merges into the completion's first token)"
        elif not chosen or not rejected:
            problem = f"empty completion '{'chosen' if not chosen else 'rejected'}' after tokenisation"
        elif truncation == "keep_start" and p >= max_length:
            problem = f"the prompt alone has {p} tokens, max_length is {max_length}: no room for a completion"
        if problem:
            bad.append(BadRow(ex.row, ex.id, problem))
            continue
        prompt = full_c[:p]
        kept = _truncate(prompt, chosen, rejected, max_length, truncation)
        pairs.append(TokenizedPair(ex.id, *kept, p + len(chosen) > max_length, p + len(rejected) > max_length))
    _apply_policy(bad, on_bad_row)
    return pairs, bad


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
        mapping.check_columns(_column_names(rows), str(path))
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


BLOCK_ROWS = 4096  # rows read, validated and tokenised at a time by iter_pair_blocks


def iter_pair_blocks(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                     on_bad_row: str = "fail", *, split: str | None = None, data_config: str | None = None,
                     mapping=None, block_rows: int = BLOCK_ROWS):
    """:func:`load_dataset_pairs` in blocks of ``block_rows`` rows: yields (pairs, bad rows) per block, so
    memory is bounded by a block, not by the data (a million pairs are never Python objects at once).

    Across blocks only ids are remembered, as 64-bit hashes with a hash of their rendered texts: an exact
    duplicate of an earlier row is dropped, an id reused for other content is a bad row. Row numbers count from
    the start of the data. With ``on_bad_row='fail'`` the first block holding a bad row raises
    :class:`BadDataError`.
    """
    import numpy as np

    _check_policy(on_bad_row)
    # Sorted id hashes and, aligned, content hashes: 16 bytes an id, in numpy, not on the Python heap (a million
    # id strings would cost ~100 bytes each, and pin the memory of every block they were made in).
    # Two ids colliding in 64 bits: ~3e-8 for a million ids.
    seen_keys, seen_contents = np.empty(0, np.uint64), np.empty(0, np.uint64)
    for start, rows in iter_row_blocks(path, split, data_config, block_rows):
        lines = getattr(rows, "lines", None)  # JSONL / CSV: bad rows are reported by line
        if mapping:
            if start == 0:
                mapping.check_columns(_column_names(rows), str(path))
            rows = [mapping.apply(r) for r in rows]
        examples, bad = prepare_examples(rows, tokenizer, "skip")
        bad = [replace(b, row=b.row + start) for b in bad]
        keys = np.array([_hash64(ex.id) for ex in examples], dtype=np.uint64)
        contents = np.array([_hash64("\0".join((ex.prompt, ex.chosen, ex.rejected))) for ex in examples], dtype=np.uint64)
        pos = np.searchsorted(seen_keys, keys).clip(max=max(len(seen_keys) - 1, 0))
        hit = (seen_keys[pos] == keys) if len(seen_keys) else np.zeros(len(keys), bool)
        kept = []
        for i, ex in enumerate(examples):
            ex = replace(ex, row=ex.row + start)
            if not hit[i]:
                kept.append(ex)
            elif seen_contents[pos[i]] != contents[i]:  # an exact duplicate of an earlier block's row is dropped
                bad.append(BadRow(ex.row, ex.id, f"id {ex.id!r} is already used by an earlier row for different content"))
        order = np.argsort(merged := np.concatenate([seen_keys, keys[~hit]]), kind="stable")
        seen_keys, seen_contents = merged[order], np.concatenate([seen_contents, contents[~hit]])[order]
        pairs, bad_tokens = tokenize_examples(kept, tokenizer, max_length, truncation, "skip")
        bad = sorted(bad + bad_tokens, key=lambda b: b.row)
        if lines:
            bad = [replace(b, line=lines[b.row - start]) for b in bad]
        _apply_policy(bad, on_bad_row, str(path))
        yield pairs, bad


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def _column_names(rows) -> list[str]:
    names: dict[str, None] = {}
    for row in rows[:1000]:
        if isinstance(row, dict):
            names.update(dict.fromkeys(row))
    return list(names)


def write_bad_rows(path: str | os.PathLike, bad_rows: list[BadRow]) -> None:
    """One JSON object per bad row: ``{"row" (0-based), "id", "problem"}``, and ``"line"`` (1-based) for JSONL/CSV."""
    write_text_atomic(path, "".join(json.dumps({"row": b.row, "id": b.id, "problem": b.problem}
                                               | ({"line": b.line} if b.line else {}), ensure_ascii=False)
                                    + "\n" for b in bad_rows), prefix=".tmp-bad_rows-")


def _check_policy(on_bad_row: str) -> None:
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {', '.join(BAD_ROW_POLICIES)}, got {on_bad_row!r}")


def _apply_policy(bad: list[BadRow], on_bad_row: str, source: str = "the data") -> None:
    if bad and on_bad_row == "fail":
        raise BadDataError(bad, source)
