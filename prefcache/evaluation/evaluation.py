"""Evaluate checkpoints of a run: lm-eval tasks (``evaluate``) and cached implicit rewards (``score``).

Both write one Parquet file per checkpoint to ``RUN/evals/`` (the ``evals`` view), in the schema
:data:`prefcache.core.schemas.EVALS`: checkpoint, step, task, metric, value, stderr, n, time, source. The base
model is the checkpoint ``base`` (step null). ``score`` also writes its per-pair rewards to ``RUN/logs/examples-score-*.parquet``.

A checkpoint is loaded as trained: a PEFT adapter on the run's base model (in 4-bit for a QLoRA run), or
full weights; its own tokenizer is used. ``score`` never loads the reference model: its values come
from the cache, joined by example id, through :func:`prefcache.training.scoring.score_pairs`, the function the
trainer logs its eval split with, so the two agree.
"""

from __future__ import annotations

import gc
import json
import math
import re
import statistics
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa

from prefcache.cache.compat import check_cache_mapping
from prefcache.cache.store import CacheError
from prefcache.core import schemas
from prefcache.core.atomic import write_table_atomic
from prefcache.core.quiet import quiet_lm_eval
from prefcache.data.columns import RowMapping
from prefcache.data.pairs import load_dataset_pairs
from prefcache.evaluation.config import EvalConfig, ScoreConfig
from prefcache.evaluation.lmeval_tasks import localise_include_paths, task_manager
from prefcache.model.load import (
    ModelSource,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model,
    tokenizer_fingerprint,
)
from prefcache.training.rundir import Checkpoint, resolve_checkpoints, run_settings

EVALS_SCHEMA = schemas.EVALS
SCORE_METRICS = ("rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected")
DEFAULT_BETA = 0.1


class EvalError(ValueError):
    """A checkpoint, run or task that cannot be evaluated; the message says why and what to do."""


def _prepare(config: EvalConfig | ScoreConfig):
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


def _release_memory() -> None:
    """After the caller dropped its model: free it now, before the next checkpoint loads."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- writing results

def _write_parquet(df: pl.DataFrame, schema: pa.Schema, folder: Path, prefix: str, checkpoint: str) -> Path:
    """Write ``df`` to ``folder/{prefix}-{checkpoint}-{UTC time}-{random}.parquet``: a new file per call,
    so results accumulate and readers never see a half-written file (temp name, then rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", checkpoint)
    path = folder / f"{prefix}-{safe}-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
    write_table_atomic(df.select(schema.names).to_arrow().cast(schema), path)
    return path


def _evals_frame(rows: list[dict]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=EVALS_SCHEMA))


def _stderr(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


# ----------------------------------------------------------------------------- lm-eval

def run_dir_of(config: EvalConfig | ScoreConfig) -> Path:
    """The run folder results of ``config`` are written to (RUN/evals/)."""
    return resolve_checkpoints(config.checkpoints, config.run, config.base, config.out)[0]


def evaluate(config: EvalConfig | None = None, **options) -> pl.DataFrame:
    """Run lm-eval tasks on checkpoints (and the base model) of a run; write ``RUN/evals/lm-eval-*.parquet``.

    ``evaluate(checkpoints=["run1"], tasks="prefcache_heldout", include_path=["examples/lm_eval_task"])``
    is the same as the CLI. Each model is handed to lm-eval as a loaded instance (``HFLM(pretrained=model)``),
    so a PEFT adapter on a 4-bit base evaluates exactly as it trained. Returns the rows written.
    """
    config = config or EvalConfig(**options)
    run_dir, checkpoints, settings, source, device = _prepare(config)
    with tempfile.TemporaryDirectory(prefix="prefcache-tasks-") as work:
        include = localise_include_paths(config.include_path, Path(work))
        manager, tasks = task_manager(config.tasks, include)  # before any model loads: fail fast
        frames = []
        for ckpt in checkpoints:
            model, tokenizer = load_checkpoint(ckpt, source, settings, quantize=config.quantize, device=device)
            results = _lm_eval(model, tokenizer, tasks, manager, config)
            del model
            _release_memory()
            frame = _evals_frame(lm_eval_rows(results, ckpt))
            _write_parquet(frame, EVALS_SCHEMA, run_dir / "evals", "lm-eval", ckpt.name)
            frames.append(frame)
    return pl.concat(frames)


def _lm_eval(model, tokenizer, tasks: list[str], manager, config: EvalConfig) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    with quiet_lm_eval():
        return simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=config.limit,
                               num_fewshot=config.num_fewshot, log_samples=False)


def lm_eval_rows(results: dict, ckpt: Checkpoint) -> list[dict]:
    """lm-eval's results dict -> evals rows: one per task (or group) and metric, with its stderr and n.
    Metric keys are ``name,filter``; the filter is kept only when it is not lm-eval's ``none``."""
    now = datetime.now(timezone.utc)
    counts = {t: int(c["effective"]) for t, c in (results.get("n-samples") or {}).items()}
    subtasks = results.get("group_subtasks") or {}

    def n_of(task: str) -> int | None:
        if task in counts:
            return counts[task]
        parts = [n_of(t) for t in subtasks.get(task, [])]
        return sum(parts) if parts and None not in parts else None

    rows = []
    merged = {**(results.get("groups") or {}), **results["results"]}
    for task, metrics in merged.items():
        for key, value in metrics.items():
            name, comma, filt = key.partition(",")  # no comma: alias, sample_len and such, not metrics
            if not comma or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{name}_stderr,{filt}")
            rows.append({"checkpoint": ckpt.name, "step": ckpt.step, "task": task,
                         "metric": name if filt in ("", "none") else key, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                         "n": n_of(task), "time": now, "source": "lm-eval"})
    return rows


# ----------------------------------------------------------------------------- cached implicit rewards

def score(config: ScoreConfig | None = None, **options) -> pl.DataFrame:
    """Implicit rewards, margins and preference accuracy of checkpoints on held-out pairs, against the cache.

    ``score(checkpoints=["run1/checkpoints/step-000100"], cache="heldout-cache", data="heldout.jsonl")``
    is the same as the CLI. Per pair: reward = beta * (policy_logps - cached ref_logps) per side (summed
    log-probs, nats), margin = reward_chosen - reward_rejected. Writes the pairs to
    ``RUN/logs/examples-score-*.parquet`` (split 'score') and the means to ``RUN/evals/score-*.parquet``
    (task 'preference'); returns the evals rows written.
    """
    config = config or ScoreConfig(**options)
    from prefcache.cache.compat import check_cache_matches
    from prefcache.cache.lookup import ReferenceTable, check_joined  # torch
    from prefcache.training.scoring import score_pairs

    run_dir, checkpoints, settings, source, device = _prepare(config)
    beta = config.beta if config.beta is not None else float(settings.get("beta", DEFAULT_BETA))
    reference = ReferenceTable.from_cache(config.cache)
    meta = reference.metadata
    mapping = RowMapping.of(config)
    check_cache_mapping(meta, mapping, config.cache)

    # Every checkpoint's tokenisation is checked, and its pairs looked up, before any model loads.
    tokenized: dict[str, list] = {}
    plan = []
    for ckpt in checkpoints:
        tokenizer = checkpoint_tokenizer(ckpt, source)
        try:
            check_cache_matches(meta, tokenizer, meta["max_length"], meta["truncation"])
        except CacheError as e:
            raise CacheError(f"checkpoint {ckpt.name}: {e}") from e
        key = tokenizer_fingerprint(tokenizer)
        if key not in tokenized:
            pairs, _, _ = load_dataset_pairs(config.data, tokenizer, meta["max_length"], meta["truncation"],
                                             config.on_bad_row, split=config.split, data_config=config.data_config,
                                             mapping=mapping)
            if not pairs:
                raise EvalError(f"{config.data}: no pairs to score")
            check_joined(reference, pairs, "held-out")  # the trainer's check: every id cached, same token counts
            tokenized[key] = pairs
        plan.append((ckpt, tokenized[key]))

    frames = []
    for ckpt, pairs in plan:
        model, tokenizer = load_checkpoint(ckpt, source, settings, quantize=config.quantize, device=device)
        cols, agg = score_pairs(model, pairs, reference, beta=beta, batch_size=config.batch_size,
                                pad_id=tokenizer.pad_token_id, device=device, chunk_size=config.chunk_size)
        del model
        _release_memory()
        n = len(cols["id"])
        examples = pl.DataFrame({**cols, "step": [ckpt.step] * n, "split": ["score"] * n, "checkpoint": [ckpt.name] * n})
        _write_parquet(examples, schemas.EXAMPLES, run_dir / "logs", "examples-score", ckpt.name)
        per_pair = {"rewards_accuracies": [float(m > 0) for m in cols["margin"]], "rewards_margins": cols["margin"],
                    "rewards_chosen": cols["reward_chosen"], "rewards_rejected": cols["reward_rejected"]}
        now = datetime.now(timezone.utc)
        frame = _evals_frame([{"checkpoint": ckpt.name, "step": ckpt.step, "task": "preference", "metric": m,
                               "value": agg[m], "stderr": _stderr(per_pair[m]), "n": n, "time": now,
                               "source": "score"} for m in SCORE_METRICS])
        _write_parquet(frame, EVALS_SCHEMA, run_dir / "evals", "score", ckpt.name)
        frames.append(frame)
    return pl.concat(frames)

