"""Validate preference rows, give each a stable id and render its texts as TRL's DPOTrainer does.

Formats (TRL's names):
- *standard*: ``prompt``, ``chosen``, ``rejected`` strings. No chat template; the tokenizer's EOS is
  appended to each completion as text unless it already ends with it.
- *conversational*: lists of ``{"role", "content"}`` messages. The chat template renders the prompt
  (``add_generation_prompt=True``) and prompt + completion; the completion text is what the latter
  adds to the former. No EOS is appended (the template closes the turn).
- *implicit prompt*: no ``prompt`` column; ``chosen``/``rejected`` are whole texts or conversations and
  their common prefix is the prompt, found as ``trl.extract_prompt`` finds it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefcache.data.badrows import BadRow, _apply_policy, _Bad, _check_policy
from prefcache.data.columns import no_completion_columns
from prefcache.data.formats import DataFormatError


@dataclass(frozen=True)
class Example:
    """One validated preference pair, its texts rendered (chat template applied, EOS appended)."""

    id: str  # the ``id`` column as a string, else a content hash (32 hex chars)
    row: int  # 0-based row index in the source file
    prompt: str
    chosen: str
    rejected: str
    conversational: bool = False  # rendered by a chat template: tokenised without adding special tokens


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
    render = lambda messages, generation: tokenizer.apply_chat_template(  # noqa: E731
        messages, tokenize=False, add_generation_prompt=generation)
    return (*split_rendering(render, prompt, {"chosen": chosen, "rejected": rejected}), True)


def split_rendering(render, prompt: list, completions: dict[str, list]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) texts of a conversation, TRL's way: ``render(messages, add_generation_prompt)``
    (a chat template) of the prompt, and of prompt + each completion, whose rendering must start with the
    prompt's; the completion's text is the rest."""
    try:
        prompt_text = render(prompt, True)
        texts = []
        for name, completion in completions.items():
            full = render(prompt + completion, False)
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
    return prompt_text, texts[0], texts[1]


def _prompt_copied_into_conversations(raw: dict) -> bool:
    """A text prompt beside chosen/rejected conversations that open with the same message: the prompt is a copy
    of that message (``HuggingFaceH4/ultrafeedback_binarized``), and TRL takes the implicit prompt instead."""
    c, r = raw.get("chosen"), raw.get("rejected")
    return (isinstance(raw.get("prompt"), str) and isinstance(c, list) and isinstance(r, list) and bool(c) and bool(r)
            and _canonical(c[0]) == _canonical(r[0]))


def refuse_images(rows, tokenizer) -> None:
    """Rows with images (TRL's ``images`` / ``image`` columns, not empty) read for a text model: refused, where the
    text path would render the texts and silently drop the pictures. Called wherever text rows are validated."""
    def given(value) -> bool:
        try:
            return value is not None and len(value) > 0
        except TypeError:  # one image object
            return True

    if any(isinstance(r, dict) and (given(r.get("images")) or given(r.get("image"))) for r in rows):
        name = getattr(tokenizer, "name_or_path", None) or "the model"
        raise DataFormatError(f"the data has images but {name} is a text model: give a vision-language model "
                              "(--model), or data without an images column")


def prepare_examples(rows: list[dict], tokenizer, on_bad_row: str = "fail") -> tuple[list[Example], list[BadRow]]:
    """Validate rows, give each its id and render its texts.

    Exact duplicates (same id, same content) yield one Example, the first; a later row reusing an id for
    different content is a bad row. Returns (examples in row order, bad rows); with ``on_bad_row='fail'``
    any bad row raises :class:`BadDataError` instead.
    """
    _check_policy(on_bad_row)
    refuse_images(rows, tokenizer)
    dicts = [r for r in rows if isinstance(r, dict)]
    if dicts and not any("chosen" in r or "rejected" in r for r in dicts):
        raise no_completion_columns(dicts[0])
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
            ex_id = given_id(row, has_id) or _hash(content)
            check_present(row, names)
            if is_duplicate(seen, ex_id, content):
                continue  # an exact duplicate: scored once, under one id
            prompt, chosen, rejected, chat = _render(raw, tokenizer)
            check_same_format(examples, chat)
            seen[ex_id] = (i, content)
            examples.append(Example(ex_id, i, prompt, chosen, rejected, chat))
        except _Bad as e:
            bad.append(BadRow(i, ex_id, str(e)))
    _apply_policy(bad, on_bad_row)
    return examples, bad


def given_id(row: dict, has_id: bool) -> str | None:
    """The row's own id when the data has an id column (then every row needs one), else None."""
    if not has_id:
        return None
    if row.get("id") is None or row["id"] == "":
        raise _Bad("'id' is missing or null (the file has an id column, so every row needs one)")
    return str(row["id"])


def check_present(row: dict, names) -> None:
    for name in names:
        if row.get(name) is None:
            raise _Bad(f"{'null' if name in row else 'missing'} field '{name}'")


def is_duplicate(seen: dict[str, tuple[int, str]], ex_id: str, content: str) -> bool:
    """Whether an earlier row (``seen``: id -> (row, content key)) has this id and content; an id an earlier row
    used for other content is a bad row."""
    if ex_id not in seen:
        return False
    first, first_content = seen[ex_id]
    if first_content != content:
        raise _Bad(f"id {ex_id!r} is already used by row {first + 1} for different content")
    return True


def check_same_format(examples: list, chat: bool) -> None:
    """Every row of a file in one format: standard and conversational rows render differently (chat template or
    not, EOS or not), so a row in the other format is a mistake."""
    if examples and chat != examples[0].conversational:
        kinds = {True: "conversational", False: "standard"}
        raise _Bad(f"a {kinds[chat]} row in a file of {kinds[not chat]} rows (row {examples[0].row + 1} "
                   "is one): every row of a file must be in the same format")
