"""prefcache.reference.config."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.options import _choice, _positive, check_device
from prefcache.data.options import BAD_ROW_POLICIES, TRUNCATIONS, DataOptions
from prefcache.model.load import QUANTIZATIONS


@dataclass(frozen=True)
class PrecomputeConfig(DataOptions):
    """What ``prefcache precompute`` does.

    data: preference data (JSONL/JSON/Parquet/CSV file or a ``datasets.save_to_disk`` folder).
    out: the cache directory (created, or extended when it already holds a matching cache).
    model: HF folder or .gguf file; None = the embedded SmolLM2-135M-Instruct.
    quantize: reference precision; ``auto`` = bf16 on a GPU, fp32 on CPU.
    revision: the Hub revision (branch, tag or commit) when ``model`` is a Hub id.
    split / data_config: the split and subset (``load_dataset(data, data_config, split=split)``) when
    ``data`` is a Hub dataset id (or a saved DatasetDict). columns / *_template: see :mod:`prefcache.data.columns`.
    max_length: tokens of prompt + completion kept per sequence.
    truncation: ``keep_start`` (TRL's default: the completion loses its tail) or ``keep_end``.
    batch_size: pairs per forward pass (2 x batch_size sequences, fewer after de-duplication).
    per_token: also store per-token log-prob lists.
    shard_size: pairs per Parquet shard; a crash loses at most one shard of work.
    chunk_size: completion positions projected through the output head at once.
    prefix_sharing: one packed row per prompt, its completions after it under a block mask (the prompt is
        computed once); off = two sequences per pair. Models that cannot take the mask fall back (said once).
    """

    data: str
    out: str
    model: str | None = None
    quantize: str = "auto"
    adapter: str | None = None
    max_length: int = 1024
    truncation: str = "keep_start"
    batch_size: int = 8
    per_token: bool = False
    on_bad_row: str = "fail"
    device: str = "auto"
    shard_size: int = 1024
    chunk_size: int = 512  # x 49k vocab x fp32 = 100 MB of logits at a time (2048: 400 MB)
    progress: bool = True
    prefix_sharing: bool = True
    unpaired: bool = False  # a KTO cache: each completion and its KL completion (prefcache.data.unpaired)
    kl_group_size: int = 8  # unpaired: KL completions rotate within groups of this many examples (TRL's batch)

    def __post_init__(self):
        super().__post_init__()  # the data options
        _choice("quantize", self.quantize, QUANTIZATIONS)
        _positive("kl_group_size", self.kl_group_size)
        _choice("truncation", self.truncation, TRUNCATIONS)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        check_device(self.device)
        for name in ("max_length", "batch_size", "shard_size", "chunk_size"):
            _positive(name, getattr(self, name))
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one prompt token and one completion token)")
