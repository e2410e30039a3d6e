"""Options of each command as frozen dataclasses, validated on construction.

The CLI builds one of these and calls the same function a Python user calls.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATIONS = ("auto", "4bit", "8bit", "bf16", "fp16", "fp32")
TRUNCATIONS = ("keep_start", "keep_end")
BAD_ROW_POLICIES = ("fail", "skip")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive(name: str, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass(frozen=True)
class PrecomputeConfig:
    """What ``prefcache precompute`` does.

    data: preference data (JSONL/JSON/Parquet/CSV file or a ``datasets.save_to_disk`` folder).
    out: the cache directory (created, or extended when it already holds a matching cache).
    model: HF folder or .gguf file; None = the embedded SmolLM2-135M-Instruct.
    quantize: reference precision; ``auto`` = bf16 on a GPU, fp32 on CPU.
    max_length: tokens of prompt + completion kept per sequence.
    truncation: ``keep_start`` (TRL's default: the completion loses its tail) or ``keep_end``.
    batch_size: pairs per forward pass (2 x batch_size sequences, fewer after de-duplication).
    per_token: also store per-token log-prob lists.
    shard_size: pairs per Parquet shard; a crash loses at most one shard of work.
    chunk_size: completion positions projected through the output head at once.
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
    chunk_size: int = 2048
    progress: bool = True

    def __post_init__(self):
        _choice("quantize", self.quantize, QUANTIZATIONS)
        _choice("truncation", self.truncation, TRUNCATIONS)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        for name in ("max_length", "batch_size", "shard_size", "chunk_size"):
            _positive(name, getattr(self, name))
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one prompt token and one completion token)")
