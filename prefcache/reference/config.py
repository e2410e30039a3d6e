"""prefcache.reference.config: what ``prefcache precompute`` does, each option declared once."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.folders import check_folder_kind
from prefcache.core.options import POSITIVE, Range, check_device, check_options, given, option
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
    fsdp: under torchrun, the reference sharded across the ranks (:mod:`prefcache.model.sharding`); the cache is the
        one an unsharded pass makes.
    prefix_sharing: one packed row per prompt, its completions after it under a block mask (the prompt is
        computed once); off = two sequences per pair. Models that cannot take the mask fall back (said once).
    """

    data: str = option(help="Preference data: .jsonl/.json/.parquet/.csv, a datasets folder, or a Hub dataset id.")
    out: str = option(help="Cache directory to create or extend.")
    model: str | None = option(None, "HF model folder, .gguf file or Hub id.", default_text="embedded SmolLM2-135M-Instruct")
    quantize: str = option("auto", "Reference precision; auto = bf16 on GPU, fp32 on CPU. 4bit = bitsandbytes NF4 + "
                           "double quant.", choices=QUANTIZATIONS)
    adapter: str | None = option(None, "PEFT adapter folder or Hub id applied on the model (e.g. your SFT LoRA).")
    max_length: int = option(1024, "Tokens kept per prompt+completion.", range=POSITIVE)
    truncation: str = option("keep_start", "keep_start drops the completion's tail (TRL's default); keep_end drops the "
                             "prompt's head.", choices=TRUNCATIONS)
    batch_size: int = option(8, "Pairs per forward pass.", range=POSITIVE)
    per_token: bool = option(False, "Also store per-token log-probs (list columns).")
    on_bad_row: str = option("fail", "fail: stop and list bad rows; skip: score the rest and write bad_rows.jsonl in "
                             "the cache.", choices=BAD_ROW_POLICIES)
    device: str = option("auto", "cpu, cuda, cuda:1, or auto.")
    shard_size: int = option(1024, "Pairs per Parquet shard.", range=POSITIVE)
    chunk_size: int = option(512, "Completion positions per output-head chunk (memory vs speed: x 49k vocab x fp32 "
                             "= 100 MB of logits at a time; 2048: 400 MB).", range=POSITIVE)
    progress: bool = option(True, "Show a progress bar.")
    prefix_sharing: bool = option(True, "Compute each prompt once, its completions packed after it under a block "
                                  "attention mask (same values to float rounding; faster the longer the prompts). "
                                  "Off: two sequences per pair.")
    unpaired: bool = option(False, "KTO cache: unpaired data (prompt/completion/label; pairs are unpaired), each "
                            "completion's and its KL completion's reference log-probs.")
    fsdp: bool = option(False, "Under torchrun: shard the reference model across the ranks with FSDP2 (each rank "
                        "holds 1/N of the weights), for a reference bigger than one device; each rank still scores "
                        "its own ids. Without it every rank holds the whole model.")
    # Two or more: with one, every example is its own KL partner (kl_id == id) and no mismatched completion exists.
    kl_group_size: int = option(8, "--unpaired: KL completions rotate within groups of this many examples (TRL's "
                                "per-device batch; at least 2).", range=Range(2))

    def __post_init__(self):
        super().__post_init__()  # the data options
        check_options(self, PrecomputeConfig)
        check_device(self.device)
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one prompt token and one completion token)")
        if self.fsdp and self.quantize in ("4bit", "8bit"):
            raise ValueError(f"--fsdp with --quantize {self.quantize} is not supported: FSDP shards float weights; "
                             "use --quantize bf16 (or fp32) with --fsdp, or drop --fsdp for a quantized reference")
        if not self.unpaired and given(self, ("kl_group_size",)):
            raise ValueError(f"kl_group_size {self.kl_group_size} applies to unpaired caches only: add unpaired "
                             "(--unpaired), or drop it")


def check_cache_out(out) -> None:
    """Refuse a run or model folder as ``--out`` before anything is written there (config.yaml, the lock)."""
    check_folder_kind(out, "cache", "choose a new --out for the cache")
