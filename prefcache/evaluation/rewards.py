"""``prefcache score``: implicit rewards, margins and preference accuracy of checkpoints on held-out pairs.

The reference model is never loaded: its values come from the cache, joined by example id, through
:func:`prefcache.training.scoring.score_pairs`, the function the trainer logs its eval split with, so the two
agree. Per-pair rewards go to ``RUN/logs/examples-score-*.parquet``, the means to ``RUN/evals/score-*.parquet``.

Under ``torchrun`` each rank scores a contiguous share of the pairs and rank 0 writes them all, in the data's
order; with ``--fsdp`` the checkpoint is sharded across the ranks too (:mod:`prefcache.model.sharding`), for a
policy bigger than one device.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from datetime import datetime, timezone

import polars as pl

from prefcache.cache.compat import check_cache_mapping
from prefcache.cache.store import CacheError
from prefcache.core import schemas
from prefcache.core.distributed import gather, setup
from prefcache.data.columns import RowMapping
from prefcache.data.store import example_images, pair_rows, store_folder
from prefcache.evaluation.checkpoints import (
    EVALS_SCHEMA,
    EvalError,
    checkpoint_processor,
    checkpoint_tokenizer,
    evals_frame,
    load_checkpoint,
    prepare,
    release_memory,
    write_parquet,
)
from prefcache.evaluation.config import ScoreConfig, check_pairs_cache
from prefcache.model.tokenization import tokenizer_key
from prefcache.training.log import IMAGES_PREFIX

SCORE_METRICS = ("rewards_accuracies", "rewards_margins", "rewards_chosen", "rewards_rejected")
DEFAULT_BETA = 0.1


def _stderr(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def score(config: ScoreConfig | None = None, **options) -> pl.DataFrame:
    """Implicit rewards, margins and preference accuracy of checkpoints on held-out pairs, against the cache.

    ``score(checkpoints=["run1/checkpoints/step-000100"], cache="heldout-cache", data="heldout.jsonl")``
    is the same as the CLI. Per pair: reward = beta * (policy_logps - cached ref_logps) per side (summed
    log-probs, nats), margin = reward_chosen - reward_rejected. Writes the pairs to
    ``RUN/logs/examples-score-*.parquet`` (split 'score') and the means to ``RUN/evals/score-*.parquet``
    (task 'preference'); returns the evals rows written.
    """
    config = config or ScoreConfig(**options)
    check_pairs_cache(config.cache)
    from prefcache.cache.compat import check_cache_matches
    from prefcache.cache.lookup import ReferenceTable, check_joined  # torch
    from prefcache.model.sharding import unsharded_note

    run_dir, checkpoints, settings, source, device = prepare(config)
    rank, world, device = setup(device)
    if config.fsdp and world == 1:
        print(unsharded_note("score"), file=sys.stderr)
    beta = config.beta if config.beta is not None else float(settings.get("beta", DEFAULT_BETA))
    reference = ReferenceTable.from_cache(config.cache)
    meta = reference.metadata
    mapping = RowMapping.of(config)
    check_cache_mapping(meta, mapping, config.cache)

    # Every checkpoint's tokenisation is checked, and its pairs looked up, before any model loads.
    tokenized: dict[str, tuple] = {}  # store key -> (pairs, their image references or None)
    plan = []
    for ckpt in checkpoints:
        processor = checkpoint_processor(ckpt, source)  # a vision-language model's; None for a text model
        tokenizer = processor.tokenizer if processor else checkpoint_tokenizer(ckpt, source)
        try:
            check_cache_matches(meta, tokenizer, meta["max_length"], meta["truncation"], processor)
        except CacheError as e:
            raise CacheError(f"checkpoint {ckpt.name}: {e}") from e
        store_key = tokenizer_key(tokenizer, processor)
        key = json.dumps(store_key, sort_keys=True)
        if key not in tokenized:
            # A view over the data's store (tokenised once, then memory-mapped by every later score)
            pairs, _ = pair_rows(config.data, tokenizer, meta["max_length"], meta["truncation"], config.on_bad_row,
                                 split=config.split, data_config=config.data_config, mapping=mapping,
                                 tokenizer_key=store_key, folder=store_folder(run_dir), world=world,
                                 processor=processor)
            if not pairs:
                raise EvalError(f"{config.data}: no pairs to score")
            check_joined(reference, pairs, "held-out")  # the trainer's check: every id cached, same token counts
            # A vision store's image references (never pixels), read once for every checkpoint that scores it.
            tokenized[key] = pairs, example_images([pairs]) if processor else None
        plan.append((ckpt, *tokenized[key], processor))

    frames = []
    for ckpt, pairs, images, processor in plan:
        cols = score_checkpoint(config, ckpt, pairs, reference, source=source, settings=settings, beta=beta,
                                device=device, rank=rank, world=world, processor=processor)
        frames.append(write_scores(cols, ckpt, run_dir, write=rank == 0, images=images))
    return pl.concat(frames)


def score_checkpoint(config: ScoreConfig, ckpt, pairs, reference, *, source, settings: dict, beta: float,
                     device: str, rank: int, world: int, processor=None) -> dict[str, list]:
    """The per-pair columns of ``ckpt`` on ``pairs``, every rank scoring its contiguous share, gathered in the
    pairs' order (on every rank); ``processor``: a vision-language model's (each batch's image tensors)."""
    from prefcache.model.sharding import local_mb, share
    from prefcache.training.scoring import score_pairs

    scorer, tokenizer = load_scorer(config, ckpt, source, settings, device, world)
    if world > 1 and rank == 0:
        how = f"sharded over {world} ranks" if hasattr(scorer, "drain") else "the whole model on every rank"
        print(f"prefcache score: {ckpt.name}: {local_mb(scorer):,.1f} MB of weights on rank 0 ({how})",
              file=sys.stderr)
    cols, _ = score_pairs(scorer, pairs.take(share(len(pairs), rank, world)), reference, beta=beta,
                          batch_size=config.batch_size, pad_id=tokenizer.pad_token_id, device=device,
                          chunk_size=config.chunk_size, processor=processor)
    if hasattr(scorer, "drain"):  # sharded: this rank's share is done, the others' forwards still need it
        scorer.drain()
    del scorer
    release_memory()
    parts = gather(cols, world)  # contiguous shares, in rank order: the pairs' own order
    return {k: [v for part in parts for v in part[k]] for k in cols}


def write_scores(cols: dict[str, list], ckpt, run_dir, *, write: bool, images=None) -> pl.DataFrame:
    """The evals rows of one checkpoint's per-pair columns; with ``write``, the pairs and the rows written to
    ``RUN/logs/examples-score-*`` and ``RUN/evals/score-*``, and a vision run's ``images`` (an
    :data:`~prefcache.core.schemas.EXAMPLE_IMAGES` table) to ``RUN/logs/example_images-score-*``."""
    from prefcache.training.scoring import aggregate

    agg, n = aggregate(cols), len(cols["id"])
    examples = pl.DataFrame({**cols, "step": [ckpt.step] * n, "split": ["score"] * n, "checkpoint": [ckpt.name] * n})
    per_pair = {"rewards_accuracies": [float(m > 0) for m in cols["margin"]], "rewards_margins": cols["margin"],
                "rewards_chosen": cols["reward_chosen"], "rewards_rejected": cols["reward_rejected"]}
    now = datetime.now(timezone.utc)
    frame = evals_frame([{"checkpoint": ckpt.name, "step": ckpt.step, "task": "preference", "metric": m,
                           "value": agg[m], "stderr": _stderr(per_pair[m]), "n": n, "time": now,
                           "source": "score"} for m in SCORE_METRICS])
    if write:
        write_parquet(examples, schemas.EXAMPLES, run_dir / "logs", "examples-score", ckpt.name)
        write_parquet(frame, EVALS_SCHEMA, run_dir / "evals", "score", ckpt.name)
        if images is not None:
            write_parquet(pl.from_arrow(images), schemas.EXAMPLE_IMAGES, run_dir / "logs", f"{IMAGES_PREFIX}-score",
                          ckpt.name)
    return frame


def load_scorer(config: ScoreConfig, ckpt, source, settings: dict, device: str, world: int):
    """(the module to score ``ckpt`` with, its tokenizer): the checkpoint's model as trained; with ``--fsdp`` on
    more than one rank, loaded on the host and sharded onto the ranks' devices, its forwards kept in step."""
    if not (config.fsdp and world > 1):
        return load_checkpoint(ckpt, source, settings, quantize=config.quantize, device=device)
    from prefcache.model.kernel import LogProbModule
    from prefcache.model.sharding import Lockstep, shard

    quantize = config.quantize or settings.get("quantize") or "auto"
    if quantize in ("4bit", "8bit"):
        raise EvalError(f"score --fsdp: {ckpt.name} would load in {quantize} (the run's precision) and FSDP shards "
                        "float weights: add --quantize bf16 (or fp32)")
    model, tokenizer = load_checkpoint(ckpt, source, settings, quantize=quantize, device="cpu")
    module = LogProbModule(model, chunk_size=config.chunk_size)
    return Lockstep(shard(module, model, device), device, tokenizer.pad_token_id), tokenizer
