"""``prefcache eval`` (lm-eval tasks) and ``prefcache score`` (cached implicit rewards)."""

from __future__ import annotations

import click

from prefcache.cli import preflight
from prefcache.cli.fields import options_from
from prefcache.cli.options import config_option
from prefcache.cli.precompute import run_api
from prefcache.core.distributed import dist_info
from prefcache.evaluation.config import EvalConfig, ScoreConfig


def _show(df, run_dir) -> None:
    for row in df.iter_rows(named=True):
        err = f" ± {row['stderr']:.4f}" if row["stderr"] is not None else ""
        click.echo(f"{row['checkpoint']:<14} {row['task']:<24} {row['metric']:<20} {row['value']:>10.4f}{err}  (n={row['n']})")
    click.echo(f"\nwritten to {run_dir}/evals/; compare: prefcache query checkpoint_compare --run {run_dir}")


@click.command("eval")
@config_option
@options_from(EvalConfig)
def eval_cmd(**options):
    """Run lm-eval tasks on checkpoints of a run, and on its base model for comparison.

    Each checkpoint is loaded as it trained (a PEFT adapter on its base, 4-bit for QLoRA, or full
    weights) and handed to lm-eval as a model instance. Results go to RUN/evals/lm-eval-*.parquet
    (the `evals` view of `prefcache sql`). The base model is included unless --no-base.
    CHECKPOINTS: checkpoint folders, names of checkpoints of --run, run folders (all their
    checkpoints), plain model folders or Hub ids (with --out), or `base`.

    \b
    Examples:
      prefcache eval run1 --tasks prefcache_heldout --include-path examples/lm_eval_task
      prefcache eval run1/checkpoints/step-000200 --tasks arc_easy,hellaswag --limit 200
      prefcache eval Qwen/Qwen2.5-0.5B-Instruct --tasks arc_easy --limit 200 --out qwen-evals
    """
    from prefcache.evaluation.checkpoints import run_dir_of
    from prefcache.evaluation.lmeval import evaluate  # polars, pyarrow, then lm-eval and torch

    config = run_api(EvalConfig, **options)
    df = run_api(evaluate, config)
    _show(df, run_dir_of(config))


@click.command("score")
@config_option
@options_from(ScoreConfig)
def score_cmd(**options):
    """Implicit rewards, margins and preference accuracy of checkpoints on held-out pairs.

    reward = beta * (policy log-prob - cached reference log-prob), summed over each completion; the
    same function computes the trainer's eval metrics, so the numbers agree. The cache must have been
    made with the checkpoint's tokenizer, chat template, max length and truncation. Per-pair rows go to
    RUN/logs/examples-score-*.parquet, the means to RUN/evals/score-*.parquet (task 'preference').
    CHECKPOINTS: as for `prefcache eval` (checkpoint folders, run folders, or `base`).

    \b
    Example:
      prefcache precompute --data heldout.jsonl --out heldout-cache
      prefcache score run1 --cache heldout-cache --data heldout.jsonl
    Across 4 GPUs, each scoring a quarter of the pairs (--fsdp: the model sharded too):
      torchrun --nproc-per-node 4 -m prefcache score run1 --cache heldout-cache --data heldout.jsonl --fsdp
    """
    config = run_api(ScoreConfig, **options)  # every option's rule, before torch loads
    run_api(preflight.score, options)  # the paths: refusals that need no model, still before torch
    from prefcache.evaluation.checkpoints import run_dir_of
    from prefcache.evaluation.rewards import score  # polars, pyarrow, then torch

    df = run_api(score, config)
    if dist_info()[0] == 0:  # torchrun: rank 0 reports (every rank scored its share)
        _show(df, run_dir_of(config))

