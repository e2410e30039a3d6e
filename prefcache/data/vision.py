"""Vision preference rows (TRL's vision format): validate them, give each a stable id that covers its images, and
render their texts with the model's processor. Tokenisation is :mod:`prefcache.data.vision_pairs`.

A row has ``images`` (a list, read by :mod:`prefcache.data.images`; TRL's single ``image`` is taken as a list of
one) and an explicit ``prompt``, in one of TRL's two formats:

- *conversational*: message lists whose contents are strings or ``[{"type": "text", "text"}, {"type": "image"}]``
  parts; the processor's chat template renders each image part as its placeholder;
- *standard*: strings, the prompt holding the processor's placeholder (``processor.image_token``, e.g.
  ``<image>``) once per image.

What TRL 1.16 does with such rows (``trl/trainer/dpo_trainer.py``: ``DataCollatorForVisionPreference``;
``trl/data_utils.py``: ``prepare_multimodal_messages``, ``apply_chat_template``):

- A dataset whose first row has ``images`` / ``image`` skips ``_prepare_dataset``: no EOS is appended, nothing
  is tokenised up front and no long prompt is dropped. The collator does it all, batch by batch.
- Conversational rows: ``prepare_multimodal_messages(prompt, images)`` turns string contents into text parts
  and puts one ``{"type": "image"}`` part per image before the text of the first string-content user message.
  It raises when the prompt's image parts are not as many as the images. Completions get the same with no
  images. ``apply_chat_template(example, processor)`` renders the prompt (``add_generation_prompt=True``) and
  prompt + chosen / prompt + rejected. The prompt text is the common prefix of the three, and each completion
  is the rest of its rendering.
- ``processor(images=..., text=prompt, add_special_tokens=False)`` expands each placeholder into the model's
  image tokens (LLaVA: (size / patch)^2 ``<image>``; Idefics3: ``<fake_token_around_image><global-img>`` then
  ``image_seq_len`` ``<image>``, then ``<fake_token_around_image>``). ``processor(text=chosen,
  add_special_tokens=False)`` tokenises each completion **separately**, not jointly with the prompt (the text
  path's common-prefix split). The model sees ``prompt_ids + chosen_ids``.
- ``max_length`` keeps the first ``max_length`` tokens of each sequence. That can cut image tokens, and then
  the forward fails ("Image features and image tokens do not match"). ``truncation_mode='keep_end'`` and
  ``precompute_ref_log_probs`` are refused for vision data.

Where prefcache matches it: conversational rows token for token (the same message conversion, template calls
and separate tokenisation with ``add_special_tokens=False``); the same placeholder-count errors, as bad rows.
Where it differs, and why:

- A template whose prompt + completion rendering does not start with its prompt rendering is a bad row, as
  in the text path; TRL cuts the prompt text back to the common prefix. The two agree wherever the prefix
  holds. A prompt ending in an assistant turn is rendered with ``add_generation_prompt=True``, as in the text path.
- Standard rows follow the text path's rules. EOS is appended to each completion as text, and the prompt is
  tokenised with the tokenizer's default special tokens, as TRL's text path does. TRL's vision collator does
  neither, only because it skips ``_prepare_dataset``: without EOS the model is never taught to stop. The
  completions are tokenised separately, as TRL's vision collator does.
- ``keep_start``: a prompt that, with its images expanded, reaches ``max_length`` is a bad row, as in the text
  path, so image tokens are never cut (TRL cuts them and fails at the forward).
- ``keep_end``: supported. The prompt loses its head as in the text path, but only tokens before the first
  image's tokens. A cut that would reach them is a bad row (TRL refuses ``keep_end`` for vision data).
- The reference log-probs are cached, keyed by an id that covers the images' content hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefcache.data.badrows import BadRow, _apply_policy, _Bad, _check_policy
from prefcache.data.columns import no_completion_columns
from prefcache.data.formats import DataFormatError
from prefcache.data.images import ImageError, ImageRef, image_refs
from prefcache.data.validate import (
    Example,
    _canonical,
    _content_key,
    _hash,
    _render,
    check_present,
    check_same_format,
    given_id,
    is_duplicate,
    split_rendering,
)

ROLES = ("system", "user", "assistant", "tool")  # prepare_multimodal_messages refuses any other role


@dataclass(frozen=True)
class VisionExample(Example):
    """A validated vision pair: its texts rendered (the prompt holds one placeholder per image), its images."""

    images: tuple[ImageRef, ...] = ()


def vision_key(prompt, chosen, rejected, images: tuple[ImageRef, ...]) -> str:
    """What a vision pair's id hashes: the text path's content key (raw fields), then the images' sha256s in
    order. A row with no images gets the text path's key, so its id is the text id."""
    key = _content_key(prompt, chosen, rejected)
    return key + "\0images:" + " ".join(r.sha256 for r in images) if images else key


def vision_id(prompt, chosen, rejected, images: tuple[ImageRef, ...]) -> str:
    """A vision pair's content hash (32 hex chars): the same texts with other images get another id."""
    return _hash(vision_key(prompt, chosen, rejected, images))


def vision_content(ex: VisionExample) -> str:
    """What a vision example's content is made of, to tell an exact duplicate from a reused id across blocks."""
    return "\0".join((ex.prompt, ex.chosen, ex.rejected, *(r.sha256 for r in ex.images)))


def _check_messages(name: str, value) -> None:
    """Message lists whose contents are strings or text / image parts (image parts carry no image: the row's
    ``images`` fill them)."""
    if not value:
        raise _Bad(f"'{name}' is an empty message list")
    for k, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _Bad(f"'{name}' message {k} is a {type(msg).__name__}, not a {{role, content}} object")
        if msg.get("role") not in ROLES:
            raise _Bad(f"'{name}' message {k}: 'role' must be one of {', '.join(ROLES)}, got {msg.get('role')!r}")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            got = "missing" if content is None else f"a {type(content).__name__}"
            raise _Bad(f"'{name}' message {k}: 'content' must be a string or a list of parts, got {got}")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image" and not set(part) & {"image", "url", "path"}:
                continue
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image":
                raise _Bad(f"'{name}' message {k} part {j}: an image part carries its own image; "
                           "put the images in the row's 'images' list")
            raise _Bad(f"'{name}' message {k} part {j}: expected {{\"type\": \"text\", \"text\": ...}} or "
                       f"{{\"type\": \"image\"}}, got {str(part)[:80]}")


def multimodal_messages(messages: list[dict], n_images: int, name: str = "prompt") -> list[dict]:
    """TRL's ``prepare_multimodal_messages`` without the image objects (a template renders a part by its type):
    string contents become text parts, the first string-content user message gets ``n_images`` image parts
    before its text, and the image parts (tool messages aside) must then be exactly ``n_images``."""
    out, included = [], False
    for msg in messages:
        if isinstance(msg["content"], str):
            parts = [{"type": "text", "text": msg["content"]}]
            if msg["role"] == "user" and not included:
                parts, included = [{"type": "image"}] * n_images + parts, True
            msg = {**msg, "content": parts}
        out.append(msg)
    found = sum(p["type"] == "image" for m in out if m["role"] != "tool" for p in m["content"])
    if found != n_images:
        if name != "prompt":
            raise _Bad(f"'{name}' has {found} image placeholder{'s' * (found != 1)}: images go in the prompt")
        raise _Bad(f"the prompt has {found} image placeholder{'s' * (found != 1)} but the row has "
                   f"{n_images} image{'s' * (n_images != 1)}")
    return out


def _render_chat(fields: dict, n_images: int, processor) -> tuple[str, str, str]:
    """Conversational fields -> (prompt, chosen, rejected) texts, rendered by the processor's chat template."""
    for name, value in fields.items():
        _check_messages(name, value)
    prompt = multimodal_messages(fields["prompt"], n_images)
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    if not template:
        raise _Bad("conversational row, but the processor has no chat template")
    render = lambda messages, generation: processor.apply_chat_template(  # noqa: E731
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation)
    completions = {name: multimodal_messages(fields[name], 0, name) for name in ("chosen", "rejected")}
    return split_rendering(render, prompt, completions)


def _render_vision(fields: dict, n_images: int, processor) -> tuple[str, str, str, bool]:
    """Validated raw fields -> (prompt, chosen, rejected) texts, and whether a chat template made them."""
    if all(isinstance(v, list) for v in fields.values()):
        return (*_render_chat({k: _canonical(v) for k, v in fields.items()}, n_images, processor), True)
    prompt, chosen, rejected, _ = _render(fields, processor.tokenizer)  # strings (or a mix: its bad row)
    placeholder = getattr(processor, "image_token", None)
    if not placeholder:
        if n_images:
            raise _Bad("standard-format row with images, but the processor defines no image placeholder: "
                       "write the prompt as messages with {\"type\": \"image\"} parts")
        return prompt, chosen, rejected, False
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if placeholder in text:
            raise _Bad(f"'{name}' holds the image placeholder {placeholder!r}: images go in the prompt")
    found = prompt.count(placeholder)
    if found != n_images:
        raise _Bad(f"the prompt has {found} image placeholder{'s' * (found != 1)} ({placeholder!r}) but the row "
                   f"has {n_images} image{'s' * (n_images != 1)}")
    return prompt, chosen, rejected, False


def _row_images(row: dict, base: Path | None) -> tuple[ImageRef, ...]:
    value = row.get("images")
    if value is None and row.get("image") is not None:  # TRL's single-image column
        value = [row["image"]]
    try:
        return image_refs(value, base)
    except ImageError as e:
        raise _Bad(str(e)) from None


def prepare_vision_examples(rows: list[dict], processor, base: Path | None = None, on_bad_row: str = "fail",
                            ) -> tuple[list[VisionExample], list[BadRow]]:
    """Validate vision rows, read their images' bytes (for the hashes; decoding is left to tokenisation), give
    each its id (:func:`vision_id`, unless the data has an ``id`` column) and render its texts.

    ``base``: the folder relative image paths are resolved against. As :func:`~prefcache.data.validate.
    prepare_examples`: exact duplicates yield one example, an id reused for other content, a missing image file
    and a placeholder count that is not the image count are bad rows. Returns (examples in row order, bad rows).
    """
    _check_policy(on_bad_row)
    dicts = [r for r in rows if isinstance(r, dict)]
    if dicts and not any("chosen" in r or "rejected" in r for r in dicts):
        raise no_completion_columns(dicts[0])
    if dicts and not any("prompt" in r for r in dicts):
        raise DataFormatError("vision rows need a 'prompt' column (TRL's vision collator has no implicit prompt)")
    has_id = any("id" in r for r in dicts)
    examples, bad = [], []
    seen: dict[str, tuple[int, str]] = {}  # id -> (first row, content key)
    for i, row in enumerate(rows):
        ex_id = None
        try:
            if not isinstance(row, dict):
                raise _Bad(f"a row must be an object with images/prompt/chosen/rejected, got a {type(row).__name__}")
            raw = {name: row.get(name) for name in ("prompt", "chosen", "rejected")}
            ex_id = given_id(row, has_id)
            check_present(row, raw)
            images = _row_images(row, base)
            content = vision_key(raw["prompt"], raw["chosen"], raw["rejected"], images)
            ex_id = ex_id or _hash(content)
            if is_duplicate(seen, ex_id, content):
                continue  # an exact duplicate: scored once, under one id
            prompt, chosen, rejected, chat = _render_vision(raw, len(images), processor)
            check_same_format(examples, chat)
            seen[ex_id] = (i, content)
            examples.append(VisionExample(ex_id, i, prompt, chosen, rejected, chat, images))
        except _Bad as e:
            bad.append(BadRow(i, ex_id, str(e)))
    _apply_policy(bad, on_bad_row)
    return examples, bad
