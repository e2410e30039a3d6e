"""Vision-language models in the one training loop: what a run of one needs beyond a text run, said once.

A run whose model is a vision-language model (:func:`~prefcache.model.vision.is_vision_source`) loads its
processor; the processor's tokenizer is the run's tokenizer. Its pairs then come from the vision data store
(:func:`~prefcache.data.store.pair_rows` with the processor, its fingerprint in the store's key), the cache check
includes the processor's settings, and each micro-batch (training, eval, ``prefcache score``) gets its image tensors
from :func:`batch_vision`. Checkpoints save the processor (tokenizer files included), so they load as a
vision-language model again. Everything else is the text run's path.
"""

from __future__ import annotations

from prefcache.losses.registry import UNPAIRED_LOSSES


def run_tokenization(cfg, source) -> tuple[object, object]:
    """(tokenizer, processor) of the run's model: a vision-language model's processor and its tokenizer, or a text
    model's tokenizer and None. Refuses, before any data is read, what a run of a vision-language model does not
    support (and ``--train-vision`` on a text model)."""
    from prefcache.model.tokenization import load_tokenization

    tokenizer, processor = load_tokenization(source)
    if processor is None:
        if cfg.train_vision:
            raise ValueError(f"--train-vision: {source.name} is a text model; it has no vision tower to train")
        return tokenizer, None
    if cfg.loss[0] in UNPAIRED_LOSSES:
        raise ValueError(f"--loss {cfg.loss[0]}: unpaired (KTO-style) training of a vision-language model "
                         f"({source.name}) is not supported yet; train it on preference pairs")
    if cfg.fsdp:
        raise ValueError(f"--fsdp: sharded training of a vision-language model ({source.name}) is not supported "
                         "yet; train it without --fsdp (DDP under torchrun works)")
    return tokenizer, processor


def batch_vision(batch, processor) -> dict | None:
    """The image tensors of a batch of pairs (``TokenizedVisionPair`` rows, their images in order), as the model
    takes them beside ``input_ids``; None for a text model (``processor`` None) or a batch without images."""
    if processor is None:
        return None
    from prefcache.model.vision import vision_inputs

    return vision_inputs([p.images for p in batch], processor)
