"""Refusals that need no model, made before torch, transformers or bitsandbytes load (a second, not 45).

Each command's CLI builds its options dataclass first (every option's own rule, :mod:`prefcache.core.options`),
then calls its check here with the options: paths only. The API functions make the same checks again later
(under the directory lock), so these are only the fast path of a refusal.
"""

from __future__ import annotations

from pathlib import Path

from prefcache.core.hub import looks_like_id
from prefcache.evaluation.config import check_pairs_cache
from prefcache.model.load import resolve_model  # a local folder or .gguf is checked without loading anything
from prefcache.reference.config import check_cache_out
from prefcache.training.checkpoint import check_same_objective
from prefcache.training.config import loss_settings
from prefcache.training.rundir import check_run_dir


def _exists(option: str, value, *, hub_ok: bool = False) -> None:
    """A local path must exist; with ``hub_ok`` a name that looks like a Hub id is left to the command."""
    if value is None or Path(value).expanduser().exists():
        return
    if not (hub_ok and looks_like_id(str(value))):
        raise FileNotFoundError(f"{option} {value}: no such file or folder")


def _model(value) -> None:
    if value in (None, "", "default"):
        return
    _exists("--model", value, hub_ok=True)
    if Path(value).expanduser().exists():
        resolve_model(value)


def _cache(option: str, value) -> None:
    if value is None:
        return
    _exists(option, value)
    from prefcache.cache.store import (  # here: pyarrow is most of a refusal's start-up time
        CacheError,
        shard_paths,
    )

    if not shard_paths(value):
        raise CacheError(f"{option} {value} is not a prefcache cache (no part-r*.parquet shards)")


def precompute(options: dict) -> None:
    _exists("--data", options.get("data"), hub_ok=True)
    out = options.get("out")
    if out is not None and Path(out).is_file():
        raise ValueError(f"--out {out} is a file, not a cache folder")
    if out is not None:
        check_cache_out(out)
    _model(options.get("model"))


def train(options: dict) -> None:
    check_run_dir(options["out"], bool(options.get("resume")))
    _exists("--data", options.get("data"), hub_ok=True)
    _exists("--eval-data", options.get("eval_data"), hub_ok=True)
    _cache("--cache", options.get("cache"))
    _cache("--eval-cache", options.get("eval_cache"))
    _model(options.get("model"))
    _exists("--adapter", options.get("adapter"), hub_ok=True)


def resume(config) -> None:
    """A resume that would change the run's loss, β or a loss option (its checkpoint's prefcache.json)."""
    if config.resume:
        check_same_objective(config.out, loss_settings(config))


def score(options: dict) -> None:
    _cache("--cache", options.get("cache"))
    check_pairs_cache(options.get("cache"))
    _exists("--data", options.get("data"), hub_ok=True)
    _model(options.get("model"))
