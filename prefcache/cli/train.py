"""``prefcache train``."""

from __future__ import annotations

import os

import click

from prefcache.cli import preflight
from prefcache.cli.fields import options_from
from prefcache.cli.options import ResumableCommand, config_option
from prefcache.cli.precompute import run_api
from prefcache.training.config import TrainConfig


@click.command("train", cls=ResumableCommand)
@config_option
@options_from(TrainConfig)
def train_cmd(**options):
    """Train a policy with DPO (or another preference loss) against a precomputed reference cache.

    Only the policy is loaded; the reference log-probs come from --cache, joined by example id,
    after checking that the cache was made with this tokenizer, chat template, max length and
    truncation. Logs go to OUT/logs/*.parquet, checkpoints to OUT/checkpoints/step-NNNNNN/ (a
    PEFT adapter, or full weights, plus the tokenizer and the state --resume needs).

    \b
    Example:
      prefcache precompute --data prefs.jsonl --out ref-cache
      prefcache train --data prefs.jsonl --cache ref-cache --out run1 --max-steps 200 --save-every 50
      prefcache train --out run1 --max-steps 400 --resume   (run1's saved options, --max-steps changed)
      prefcache train --config run1/config.yaml --out run1-again   (run1's options, one changed)
      prefcache train --config run1/config.yaml --out run1-nobar --no-progress --no-group-by-length
    Reference-free, no cache:  prefcache train --data prefs.jsonl --out run2 --loss simpo --beta 2
    Data-parallel:             torchrun --nproc-per-node 2 -m prefcache train --data ... --cache ... --out run3
    """
    config = run_api(TrainConfig, **options)  # every option's rule, before torch loads
    run_api(preflight.train, options)  # the paths: refusals that need no model, still before torch
    run_api(preflight.resume, config)  # a resume that would change the run's loss
    from prefcache.training.loop import train  # torch

    result = run_api(train, config)
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun: rank 0 reports
        return
    t, e = result["train"], result["eval"]
    line = f"{result['run']}: {result['steps']} steps in {result['seconds']:.1f}s"
    if t and t.get("rewards_accuracies") is None:  # kto / apo_zero_unpaired: no pairs, no accuracy
        line += f"; last step loss {t['loss']:.4f}, kl {t.get('kl') or 0:.4f}"
    elif t:
        line += f"; last step loss {t['loss']:.4f}, accuracy {t['rewards_accuracies']:.2f}, margin {t['rewards_margins']:.4f}"
    click.echo(line)
    if e and e.get("rewards_accuracies") is None:
        click.echo(f"eval: loss {e['loss']:.4f}, kl {e.get('kl') or 0:.4f} ({e['n']} examples)")
    elif e:
        click.echo(f"eval: loss {e['loss']:.4f}, accuracy {e['rewards_accuracies']:.2f}, margin {e['rewards_margins']:.4f} "
                   f"({e['n']} pairs)")
    click.echo(f"final checkpoint: {result['final_checkpoint']}")
