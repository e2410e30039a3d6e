"""``prefcache eval``: lm-eval tasks on checkpoints of a run (and its base model), one results file per checkpoint.

Each model is handed to lm-eval loaded, as trained: a causal LM as ``HFLM(pretrained=model)``, a vision-language
model with its processor to lm-eval's multimodal backend (``hf-multimodal``, :func:`multimodal_lm`); task folders
given with ``--include-path`` are copied with their data paths made absolute
(:mod:`prefcache.evaluation.lmeval_tasks`).
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

import polars as pl

from prefcache.core.quiet import quiet_lm_eval
from prefcache.evaluation.checkpoints import (
    EVALS_SCHEMA,
    EvalError,
    checkpoint_processor,
    evals_frame,
    is_vision_checkpoint,
    load_checkpoint,
    prepare,
    release_memory,
    write_parquet,
)
from prefcache.evaluation.config import EvalConfig
from prefcache.evaluation.lmeval_tasks import TaskError, localise_include_paths, task_manager
from prefcache.training.rundir import Checkpoint


def evaluate(config: EvalConfig | None = None, **options) -> pl.DataFrame:
    """Run lm-eval tasks on checkpoints (and the base model) of a run; write ``RUN/evals/lm-eval-*.parquet``.

    ``evaluate(checkpoints=["run1"], tasks="prefcache_heldout", include_path=["examples/lm_eval_task"])``
    is the same as the CLI. Each model is handed to lm-eval as a loaded instance (``HFLM(pretrained=model)``;
    a vision-language model with its processor, to ``hf-multimodal``), so a PEFT adapter on a 4-bit base
    evaluates exactly as it trained. Returns the rows written.
    """
    config = config or EvalConfig(**options)
    run_dir, checkpoints, settings, source, device = prepare(config)
    with tempfile.TemporaryDirectory(prefix="prefcache-tasks-") as work:
        include = localise_include_paths(config.include_path, Path(work))
        manager, tasks, leaves = task_manager(config.tasks, include)  # before any model loads: fail fast
        vision = {ckpt.name: is_vision_checkpoint(ckpt, source) for ckpt in checkpoints}
        check_image_tasks(leaves, vision)
        frames = []
        for ckpt in checkpoints:
            model, tokenizer = load_checkpoint(ckpt, source, settings, quantize=config.quantize, device=device)
            if vision[ckpt.name]:
                lm = multimodal_lm(model, checkpoint_processor(ckpt, source), config.batch_size)
            else:
                lm = _hflm(model, tokenizer, config.batch_size)
            results = _lm_eval(lm, tasks, manager, config)
            del model, lm
            release_memory()
            frame = evals_frame(lm_eval_rows(results, ckpt))
            write_parquet(frame, EVALS_SCHEMA, run_dir / "evals", "lm-eval", ckpt.name)
            frames.append(frame)
    return pl.concat(frames)


def check_image_tasks(leaves: dict, vision: dict[str, bool]) -> None:
    """Refuse, before any model loads, image tasks that cannot run: ``leaves`` {task: lm-eval Task},
    ``vision`` {checkpoint: is a vision-language model}. A task with images needs a vision-language model, and
    is run by generation: lm-eval's hf-multimodal (0.4.13) raises NotImplementedError on loglikelihood
    requests that carry images. Text tasks run on every model (on a vision-language one, without pixels)."""
    media = {name: task for name, task in leaves.items() if getattr(task, "MULTIMODAL", False)}
    if audio := sorted(name for name, task in media.items() if getattr(task.config, "doc_to_audio", None)):
        raise TaskError(f"{', '.join(audio)}: audio tasks are not supported (lm-eval's hf-multimodal takes images)")
    if scored := sorted(name for name, task in media.items() if task.OUTPUT_TYPE != "generate_until"):
        raise TaskError(f"{', '.join(scored)}: image tasks scored by log-likelihood ("
                        f"{', '.join(sorted({media[n].OUTPUT_TYPE for n in scored}))}) cannot run: lm-eval's "
                        "multimodal backend (hf-multimodal) runs image tasks by generation only (output_type: "
                        "generate_until); text tasks of any output type run on a vision-language model")
    if media and (text := [name for name, is_vlm in vision.items() if not is_vlm]):
        raise EvalError(f"{', '.join(sorted(media))}: tasks with images need a vision-language model, and "
                        f"{', '.join(text)} {'is a text model' if len(text) == 1 else 'are text models'}; "
                        "evaluate text models on text tasks")


def _hflm(model, tokenizer, batch_size: int):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def multimodal_lm(model, processor, batch_size: int):
    """lm-eval's multimodal backend (``HFMultimodalLM``, registered as ``hf-multimodal``) on a loaded
    vision-language model and its processor.

    Images go where the task's prompt has lm-eval's ``<image>`` placeholder (one per image of ``doc_to_image``),
    replaced by the model's image token; the processor expands it into the image's tokens. Text requests (no
    images) fall back to lm-eval's text path on the same model.

    HFMultimodalLM takes a model instance as ``pretrained`` (HFLM's init), but not a processor instance:
    lm-eval 0.4.13's ``_create_tokenizer`` returns one given as ``tokenizer`` without keeping it (so
    ``self.processor`` is never set), and without one it loads ``AutoProcessor`` from the model's
    ``name_or_path``: the base model's, not the checkpoint's. The subclass keeps the processor it is given;
    all the rest is lm-eval's.
    """
    from lm_eval.models.hf_vlms import HFMultimodalLM

    class LoadedMultimodalLM(HFMultimodalLM):
        def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
            self.processor, self.tokenizer = tokenizer, tokenizer.tokenizer

    # backend "causal": the decoder-only VLMs transformers loads (lm-eval guesses so too, with a warning)
    return LoadedMultimodalLM(pretrained=model, tokenizer=processor, batch_size=batch_size, backend="causal")


def _lm_eval(lm, tasks: list[str], manager, config: EvalConfig) -> dict:
    from lm_eval import simple_evaluate

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
