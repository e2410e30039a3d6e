"""Whether a cache fits the run about to read it.

A cache's values are only comparable with a policy's when both tokenised the same texts the same way:
the tokenizer (its fingerprint), the chat template, max length and truncation (:func:`check_cache_matches`),
and the column mapping and templates that rendered the texts (:func:`check_cache_mapping`). Each refusal
names what differs. How the values were computed (packed rows or two sequences) is read here too.
"""

from __future__ import annotations

from prefcache.cache.store import TOKENIZATION_KEYS, CacheError, differences
from prefcache.data.columns import RowMapping
from prefcache.model.load import chat_template_hash, tokenizer_fingerprint
from prefcache.model.vision import processor_record


def check_cache_mapping(meta: dict, mapping: RowMapping, cache: str = "the reference cache") -> None:
    """Refuse a cache made with other columns or templates (a cache without the key was made with none)."""
    have, want = meta.get("data_mapping"), mapping.record()
    if have != want:
        raise CacheError(f"{cache} was made with data mapping {have} but this run asks for {want}: the rendered "
                         "texts differ. Use the --columns/--*-template the cache was made with, or precompute a new cache")


def cache_sharing(meta: dict) -> bool:
    """Whether a cache's values came from packed rows (caches made before prefix sharing: no)."""
    return bool(meta.get("prefix_sharing", False))


def check_cache_matches(meta: dict, tokenizer, max_length: int, truncation: str, processor=None) -> None:
    """Refuse a cache whose tokenisation is not the one about to be used, saying what differs. ``processor``: a
    vision-language model's (its image settings decide the image tokens and pixels); None for a text model."""
    want = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "chat_template_hash": chat_template_hash(tokenizer),
            "max_length": max_length, "truncation": truncation, **processor_record(processor)}
    if diff := differences(meta, want, TOKENIZATION_KEYS):
        raise CacheError("the reference cache does not match this model's tokenisation:\n  " + "\n  ".join(diff))

