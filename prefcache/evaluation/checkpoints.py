"""What ``eval`` and ``score`` share: the checkpoints of a run, each loaded as trained, and the results files.

Both commands write one Parquet file per checkpoint to ``RUN/evals/`` (the ``evals`` view), in the schema
:data:`prefcache.core.schemas.EVALS`: checkpoint, step, task, metric, value, stderr, n, time, source. The base
model is the checkpoint ``base`` (step null).

A checkpoint is loaded as trained: a PEFT adapter on the run's base model (in 4-bit for a QLoRA run), or
full weights; its own tokenizer is used, and a vision-language model's own processor.
"""

from __future__ import annotations

import gc
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa

from prefcache.core import schemas
from prefcache.core.atomic import write_table_atomic
from prefcache.evaluation.config import EvalConfig, ScoreConfig
from prefcache.model.load import (
    ModelSource,
    load_model,
    load_processor,
    load_tokenizer,
    resolve_device,
    resolve_model,
)
from prefcache.training.rundir import Checkpoint, resolve_checkpoints, run_settings

EVALS_SCHEMA = schemas.EVALS
# A saved processor: transformers 5 writes processor_config.json (image processor inside), 4.x preprocessor_config.json.
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


class EvalError(ValueError):
    """A checkpoint, run or task that cannot be evaluated; the message says why and what to do."""


def prepare(config: EvalConfig | ScoreConfig):
    """(run folder, checkpoints, run settings, base model source or None, device) for a config.
    The base model: --model, else the run's, else the base an adapter names, else the embedded default."""
    run_dir, checkpoints = resolve_checkpoints(config.checkpoints, config.run, config.base, config.out)
    settings = run_settings(run_dir)
    model = config.model if config.model is not None else settings.get("model")
    adapters = [c.path / "adapter_config.json" for c in checkpoints if c.kind == "adapter"]
    if model is None and "model" not in settings and adapters:
        model = json.loads(adapters[0].read_text()).get("base_model_name_or_path")
    revision = config.revision if config.model is not None else settings.get("revision")
    source = resolve_model(model, revision) if any(c.kind != "full" for c in checkpoints) else None
    return run_dir, checkpoints, settings, source, resolve_device(config.device)


def load_checkpoint(ckpt: Checkpoint, source, settings: dict, *, quantize: str | None, device: str):
    """(model, tokenizer) of a checkpoint as trained: an adapter on the base model, or full weights.
    The base model is the run's starting point: its model plus, if it started from one, its adapter."""
    quantize = quantize or settings.get("quantize") or "auto"
    if ckpt.kind == "full":
        model, _ = load_model(ModelSource(ckpt.name, ckpt.path), quantize=quantize, device=device)
    else:
        adapter = ckpt.path if ckpt.kind == "adapter" else settings.get("adapter")
        model, _ = load_model(source, quantize=quantize, device=device, adapter=adapter)
    return model, checkpoint_tokenizer(ckpt, source)


def checkpoint_tokenizer(ckpt: Checkpoint, source):
    """The tokenizer saved with the checkpoint, else the base model's."""
    if ckpt.path is not None and (ckpt.path / "tokenizer_config.json").exists():
        return load_tokenizer(ModelSource(ckpt.name, ckpt.path))
    return load_tokenizer(source)


def is_vision_checkpoint(ckpt: Checkpoint, source) -> bool:
    """Whether a checkpoint's model is a vision-language model, from its config alone (no weights load): full
    weights carry their own config, an adapter (or ``base``) is on the base model."""
    from prefcache.model.vision import is_vision_source

    return is_vision_source(ModelSource(ckpt.name, ckpt.path) if ckpt.kind == "full" else source)


def checkpoint_processor(ckpt: Checkpoint, source):
    """A vision-language checkpoint's processor: the one saved with it (a run saves it beside the tokenizer),
    else the base model's, given the checkpoint's own tokenizer when it has one (the tokens it trained on);
    None when the checkpoint is a text model."""
    if not is_vision_checkpoint(ckpt, source):
        return None
    if ckpt.path is not None and any((ckpt.path / f).exists() for f in PROCESSOR_FILES):
        return load_processor(ModelSource(ckpt.name, ckpt.path))
    if source is None:
        raise EvalError(f"checkpoint {ckpt.name} is a vision-language model saved without its processor "
                        f"({PROCESSOR_FILES[0]}): save the base model's processor into it "
                        f"(AutoProcessor.from_pretrained(BASE).save_pretrained({ckpt.path}))")
    processor = load_processor(source)
    if ckpt.path is not None and (ckpt.path / "tokenizer_config.json").exists():
        processor.tokenizer = checkpoint_tokenizer(ckpt, source)
    return processor


def release_memory() -> None:
    """After the caller dropped its model: free it now, before the next checkpoint loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_parquet(df: pl.DataFrame, schema: pa.Schema, folder: Path, prefix: str, checkpoint: str) -> Path:
    """Write ``df`` to ``folder/{prefix}-{checkpoint}-{UTC time}-{random}.parquet``: a new file per call,
    so results accumulate and readers never see a half-written file (temp name, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", checkpoint)
    path = folder / f"{prefix}-{safe}-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    write_table_atomic(df.select(schema.names).to_arrow().cast(schema), path)
    return path


def evals_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=EVALS_SCHEMA))


def run_dir_of(config: EvalConfig | ScoreConfig) -> Path:
    """The run folder results of ``config`` are written to (RUN/evals/)."""
    return resolve_checkpoints(config.checkpoints, config.run, config.base, config.out)[0]
