"""``prefcache eval``: lm-eval tasks on checkpoints of a run (and its base model), one results file per checkpoint.

Each model is handed to lm-eval loaded, as trained (``HFLM(pretrained=model)``); task folders given with
``--include-path`` are copied with their data paths made absolute (:mod:`prefcache.evaluation.lmeval_tasks`).
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from prefcache.core.quiet import quiet_lm_eval
from prefcache.evaluation.checkpoints import (
    EVALS_SCHEMA,
    evals_frame,
    load_checkpoint,
    prepare,
    release_memory,
    write_parquet,
)
from prefcache.evaluation.config import EvalConfig
from prefcache.evaluation.lmeval_tasks import localise_include_paths, task_manager
from prefcache.training.rundir import Checkpoint


def evaluate(config: EvalConfig | None = None, **options) -> pl.DataFrame:
    """Run lm-eval tasks on checkpoints (and the base model) of a run; write ``RUN/evals/lm-eval-*.parquet``.

    ``evaluate(checkpoints=["run1"], tasks="prefcache_heldout", include_path=["examples/lm_eval_task"])``
    is the same as the CLI. Each model is handed to lm-eval as a loaded instance (``HFLM(pretrained=model)``),
    so a PEFT adapter on a 4-bit base evaluates exactly as it trained. Returns the rows written.
    """
    config = config or EvalConfig(**options)
    run_dir, checkpoints, settings, source, device = prepare(config)
    with tempfile.TemporaryDirectory(prefix="prefcache-tasks-") as work:
        include = localise_include_paths(config.include_path, Path(work))
        manager, tasks = task_manager(config.tasks, include)  # before any model loads: fail fast
        frames = []
        for ckpt in checkpoints:
            model, tokenizer = load_checkpoint(ckpt, source, settings, quantize=config.quantize, device=device)
            results = _lm_eval(model, tokenizer, tasks, manager, config)
            del model
            release_memory()
            frame = evals_frame(lm_eval_rows(results, ckpt))
            write_parquet(frame, EVALS_SCHEMA, run_dir / "evals", "lm-eval", ckpt.name)
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
