"""A model's tokenisation: a text model's tokenizer, or a vision-language model's processor and its tokenizer, and
what they add to a data store's key. Every stage that reads data for a model (precompute, train, score) gets them
here, so a vision-language model is told apart in one place."""

from __future__ import annotations

from prefcache.model.load import ModelSource, chat_template_hash, load_tokenizer, tokenizer_fingerprint
from prefcache.model.vision import is_vision_source, load_processor, processor_record


def load_tokenization(source: ModelSource) -> tuple:
    """(tokenizer, processor) of a model: a vision-language model's processor and its tokenizer (whether it is one
    is read from its config alone), or a text model's tokenizer and None."""
    if is_vision_source(source):
        processor = load_processor(source)
        return processor.tokenizer, processor
    return load_tokenizer(source), None


def tokenizer_key(tokenizer, processor=None) -> dict:
    """What a tokenizer (and a vision-language model's processor) adds to a data store's key
    (:func:`prefcache.data.store.store_key`)."""
    return {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "chat_template_hash": chat_template_hash(tokenizer),
            **processor_record(processor)}
