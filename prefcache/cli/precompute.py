"""``prefcache precompute``, ``inspect`` and ``verify``."""

from __future__ import annotations

import json

import click

from prefcache.cli import preflight
from prefcache.cli.fields import options_from
from prefcache.cli.options import config_option
from prefcache.data.options import DataOptions
from prefcache.reference.config import PrecomputeConfig


def run_api(fn, *args, **kwargs):
    """Call an API function, turning the errors it raises for bad input into one-line CLI errors."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, FileNotFoundError, OSError) as e:  # our error classes subclass ValueError
        raise click.ClickException(str(e)) from e


@click.command("precompute")
@config_option
@options_from(PrecomputeConfig)
def precompute_cmd(**options):
    """Score every pair once with the frozen reference model and cache the log-probs.

    A rerun of the same command resumes: only ids not yet cached are scored, and adding rows
    to the data scores only the new ones. Asking to extend a cache with another model or other
    settings is refused.

    \b
    Example:
      prefcache precompute --data prefs.jsonl --out ref-cache --quantize 4bit --max-length 512
      prefcache precompute --model Qwen/Qwen2.5-0.5B-Instruct --data HuggingFaceH4/ultrafeedback_binarized --split train_prefs --out c
      prefcache precompute --config ref-cache/config.yaml   (the options a cache was made with)
    A vision-language model (LLaVA, Idefics3/SmolVLM, ...) on TRL's vision format (an images column, image
    parts in the prompt): its processor tokenises, each pair's id covers its images, each image is encoded once:
      prefcache precompute --model HuggingFaceTB/SmolVLM-256M-Instruct --data HuggingFaceH4/rlaif-v_formatted --split train --out vlm-cache
    Data-parallel (one shard set per rank):
      torchrun --nproc-per-node 2 -m prefcache precompute --data prefs.jsonl --out ref-cache
    A reference bigger than one GPU, sharded over 8 (FSDP2; the same cache):
      torchrun --nproc-per-node 8 -m prefcache precompute --fsdp --quantize bf16 --data prefs.jsonl --out ref-cache
    """
    config = run_api(PrecomputeConfig, **options)  # every option's rule, before torch loads
    run_api(preflight.precompute, options)  # the paths: refusals that need no model, still before torch
    from prefcache.reference.shards import precompute  # the API: data, models and (when scoring) torch

    result = run_api(precompute, config)
    if result["rank"] != 0:
        return
    what = "examples" if config.unpaired else "pairs"
    click.echo(
        f"{result['cache']}: {result['scored']} {what} scored, {result['cached_before']} already cached, "
        f"{result['bad_rows']} bad rows skipped; {result['seconds']:.1f}s "
        f"({result['pairs_per_s']:.1f} {what}/s, {result['tokens_per_s']:,.0f} tokens/s)"
    )
    if result["world_size"] > 1 and result["reference_mb_per_rank"] is not None:
        how = f"sharded over {result['world_size']} ranks" if config.fsdp else "the whole model on every rank"
        click.echo(f"reference weights on rank 0: {result['reference_mb_per_rank']:,.1f} MB ({how})")
    if result["bad_rows"]:
        click.echo(f"skipped rows are listed in {result['cache']}/bad_rows.jsonl")
    if result["problems"]:
        raise click.ClickException("cache check failed:\n  " + "\n  ".join(result["problems"]))


@click.command("inspect")
@config_option
@click.argument("cache")
@click.option("--json/--no-json", "as_json", help="Print the summary as JSON.")
def inspect_cmd(cache, as_json):
    """Show a cache's metadata, row count and summary statistics.

    \b
    Example:
      prefcache inspect ref-cache
    """
    from prefcache.cache.store import summary

    info = run_api(summary, cache)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(f"cache      {info['path']}  ({info['shards']} shards, {info['rows']} rows, {info['unique_ids']} unique ids)")
    for key, value in info["metadata"].items():
        click.echo(f"  {key:<22} {value}")
    click.echo(f"\n  {'column':<18} {'mean':>12} {'std':>12} {'min':>12} {'max':>12}")
    for col, s in info["columns"].items():
        click.echo(f"  {col:<18} " + " ".join(f"{_fmt(s[k]):>12}" for k in ("mean", "std", "min", "max")))
    click.echo(f"\n  truncated: chosen {_pct(info['chosen_truncated_frac'])}, rejected {_pct(info['rejected_truncated_frac'])}")
    click.echo(f"  reference already prefers chosen on {_pct(info['ref_prefers_chosen_frac'])} of pairs")


def _fmt(v):
    return "-" if v is None else f"{v:.4g}"


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}%"


@click.command("verify")
@config_option
@click.argument("cache")
@click.option("--data", default=None, help="The data the cache should cover (checks every id is present once).")
@options_from(DataOptions, only=("split", "data_config"))
def verify_cmd(cache, data, split, data_config):
    """Check a cache: shard integrity, consistent metadata, no duplicate ids, no NaN/inf, coverage of --data.

    Exits non-zero with a report when anything is wrong.

    \b
    Example:
      prefcache verify ref-cache --data prefs.jsonl
    """
    from prefcache.reference.shards import verify_cache

    report = run_api(verify_cache, cache, data, split=split, data_config=data_config)
    click.echo(report["summary"])
    if report["problems"]:
        raise click.ClickException(f"{len(report['problems'])} problem(s):\n  " + "\n  ".join(report["problems"]))
