"""Vision pairs tokenised with the model's processor, whole blocks at a time: the third kind of example the
reference pass reads (after pairs and unpaired examples), through :func:`iter_vision_pair_blocks`, which yields
what :func:`~prefcache.data.pairs.iter_pair_blocks` yields.

What TRL 1.16 does with vision rows, and where prefcache matches it: :mod:`prefcache.data.vision`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefcache.data.badrows import BadRow, _apply_policy, _check_policy
from prefcache.data.images import ImageError, ImageRef, data_folder, open_images
from prefcache.data.pairs import iter_example_blocks, with_lines
from prefcache.data.tokens import TokenizedPair, _common_prefix, _truncate, check_length_options, pair_problem
from prefcache.data.vision import VisionExample, prepare_vision_examples, vision_content

# Rows read at a time: a block holds its rows' encoded image bytes (Parquet, datasets: ~0.1-1 MB an image) and
# the processor decodes each row's images while it tokenises that row, so blocks are smaller than text's 4096.
VISION_BLOCK_ROWS = 256


@dataclass(frozen=True)
class TokenizedVisionPair(TokenizedPair):
    """A :class:`~prefcache.data.tokens.TokenizedPair` whose ``prompt_ids`` hold its images' tokens, expanded by
    the processor (never truncated), and ``images``: the pictures those tokens stand for, in order
    (:meth:`ImageRef.open` gives each back as RGB for a batch's pixel values)."""

    images: tuple[ImageRef, ...] = ()

    def __post_init__(self):  # read back from a data store: {"sha256", "path", "data"} dicts
        if any(isinstance(r, dict) for r in self.images):
            object.__setattr__(self, "images", tuple(ImageRef(**r) if isinstance(r, dict) else r for r in self.images))


def _image_start(prompt_ids: list[int], plain: list[int], placeholder: int | None) -> int:
    """Tokens of the prompt before its first image's tokens: where the processor's ids leave the plain
    tokenisation of the same text (which holds one placeholder per image), or where that placeholder is."""
    n = _common_prefix(prompt_ids, plain)
    if placeholder is not None and placeholder in plain[:n]:
        n = plain.index(placeholder)
    return n


def _prompt_ids(ex: VisionExample, processor) -> list[int]:
    """``processor(text=prompt, images=...)``: the rendered prompt with each placeholder expanded into the
    model's image tokens. ``add_special_tokens=False`` for chat-rendered text, as TRL (the template wrote them)."""
    images = open_images(ex.images)
    out = processor(text=[ex.prompt], images=[images] if images else None, add_special_tokens=not ex.conversational)
    return [int(t) for t in out["input_ids"][0]]


def tokenize_vision_examples(examples: list[VisionExample], processor, max_length: int, truncation: str = "keep_start",
                             on_bad_row: str = "fail") -> tuple[list[TokenizedVisionPair], list[BadRow]]:
    """Tokenise vision pairs as TRL's vision collator does, then truncate as the text path does.

    ``prompt_ids``: the processor on the rendered prompt and the row's images (decoded here, one row at a time).
    ``chosen_ids`` / ``rejected_ids``: the tokenizer on each completion text alone, ``add_special_tokens=False``
    (TRL's ``processor(text=chosen, add_special_tokens=False)``; the processor passes text-only calls to its
    tokenizer). Bad rows: an image that cannot be decoded, a processor error, an empty prompt or completion,
    under ``keep_start`` a prompt of ``>= max_length`` tokens (image tokens are never cut), under ``keep_end`` a
    prompt whose head would be cut into its first image's tokens. ``*_truncated`` as in the text path.
    """
    _check_policy(on_bad_row)
    check_length_options(max_length, truncation)
    tok = processor.tokenizer
    placeholder = getattr(processor, "image_token", None)
    placeholder_id = tok.convert_tokens_to_ids(placeholder) if placeholder else None
    n = len(examples)
    completions = tok([ex.chosen for ex in examples] + [ex.rejected for ex in examples], add_special_tokens=False,
                      verbose=False)["input_ids"] if examples else []
    pairs, bad = [], []
    for k, ex in enumerate(examples):
        try:
            prompt = _prompt_ids(ex, processor)
        except ImageError as e:
            bad.append(BadRow(ex.row, ex.id, str(e)))
            continue
        except Exception as e:  # the processor's own checks (ValueError, and others for odd images)
            bad.append(BadRow(ex.row, ex.id, f"the processor failed: {type(e).__name__}: {e}"))
            continue
        chosen, rejected = completions[k], completions[n + k]
        p = len(prompt)
        plain = tok(ex.prompt, add_special_tokens=not ex.conversational, verbose=False)["input_ids"]
        image_start = _image_start(prompt, plain, placeholder_id) if ex.images else p
        problem = pair_problem(p, chosen, rejected, max_length, truncation, "the prompt has no tokens",
                               "tokens with its images expanded", " (image tokens are never cut)")
        if problem is None:
            kept = _truncate(prompt, chosen, rejected, max_length, truncation)
            if (cut := p - len(kept[0])) > image_start:
                problem = (f"keep_end would cut the prompt's first {cut} tokens, into its image tokens (they start "
                           f"at token {image_start + 1}): raise max_length, or use keep_start")
        if problem:
            bad.append(BadRow(ex.row, ex.id, problem))
            continue
        pairs.append(TokenizedVisionPair(ex.id, *kept, p + len(chosen) > max_length, p + len(rejected) > max_length,
                                         ex.images))
    _apply_policy(bad, on_bad_row)
    return pairs, bad


def iter_vision_tokenized_blocks(path: str | os.PathLike, processor, max_length: int, truncation: str = "keep_start",
                                 *, split: str | None = None, data_config: str | None = None, mapping=None,
                                 block_rows: int = VISION_BLOCK_ROWS):
    """(pairs, bad rows, examples) per block of vision rows, pairs and examples aligned one to one, as
    :func:`~prefcache.data.pairs.iter_tokenized_blocks` gives text pairs; bad rows are left to the caller's
    policy. Relative image paths are resolved against the data file's folder."""
    base = data_folder(path)
    blocks = iter_example_blocks(path, processor.tokenizer, split=split, data_config=data_config, mapping=mapping,
                                 block_rows=block_rows, content=vision_content,
                                 prepare=lambda rows: prepare_vision_examples(rows, processor, base, "skip"))
    for examples, bad, lines in blocks:
        pairs, bad_tokens = tokenize_vision_examples(examples, processor, max_length, truncation, "skip")
        dropped = {b.row for b in bad_tokens}
        yield pairs, with_lines(sorted(bad + bad_tokens, key=lambda b: b.row), lines), \
            [ex for ex in examples if ex.row not in dropped]


def iter_vision_pair_blocks(path: str | os.PathLike, processor, max_length: int, truncation: str = "keep_start",
                            on_bad_row: str = "fail", *, split: str | None = None, data_config: str | None = None,
                            mapping=None, block_rows: int = VISION_BLOCK_ROWS):
    """:func:`~prefcache.data.pairs.iter_pair_blocks` for vision rows: yields (pairs, bad rows) per block of
    ``block_rows`` rows, ``processor`` in the tokenizer's place. Ids are remembered across blocks (exact
    duplicates dropped, a reused id a bad row); row numbers count from the start of the data, and lines are
    given for JSONL. With ``on_bad_row='fail'`` the first block holding a bad row raises
    :class:`~prefcache.data.badrows.BadDataError`."""
    _check_policy(on_bad_row)
    for pairs, bad, _ in iter_vision_tokenized_blocks(path, processor, max_length, truncation, split=split,
                                                      data_config=data_config, mapping=mapping, block_rows=block_rows):
        _apply_policy(bad, on_bad_row, str(path))
        yield pairs, bad
