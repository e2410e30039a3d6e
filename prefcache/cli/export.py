"""``prefcache export``."""

from __future__ import annotations

import click

from prefcache.cli.precompute import run_api
from prefcache.export import DTYPES  # the module imports torch only inside its functions


@click.command("export")
@click.argument("checkpoint")
@click.option("--out", required=True, help="Folder to write (must not exist, or be empty).")
@click.option("--merge/--no-merge",
              help="Merge the LoRA adapter into the base: one plain transformers model folder. A QLoRA base is "
                   "de-quantised (loaded in full precision) first, never merged in 4-bit. Refused on a full "
                   "fine-tune (nothing to merge: --dtype casts it).")
@click.option("--dtype", type=click.Choice(DTYPES), default=None, help="Weights' dtype [default: the base model's own].")
@click.option("--model", default=None, help="The base model folder, if it moved since training [default: the run's].")
def export_cmd(checkpoint, out, merge, dtype, model):
    """Export CHECKPOINT (RUN/checkpoints/step-NNNNNN) as an adapter or a merged model, with a model card.

    The model card (README.md) names the base model, the data and its pair count, the loss and beta,
    the steps, the final train/eval metrics and the reference cache's fingerprint.

    \b
    Example:
      prefcache export run1/checkpoints/step-000200 --out smol-dpo-adapter
      prefcache export run1/checkpoints/step-000200 --out smol-dpo --merge --dtype bf16
    """
    from prefcache.export import export

    result = run_api(export, checkpoint, out, merge=merge, dtype=dtype, model=model)
    what = f"merged model ({result['dtype']})" if result["merged"] else "checkpoint as saved"
    click.echo(f"{result['out']}: {what}; files: {', '.join(result['files'])}")
