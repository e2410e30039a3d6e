"""``prefcache train``."""

from __future__ import annotations

import os

import click

from prefcache.cli import preflight
from prefcache.cli.options import config_option, data_options, revision_option
from prefcache.cli.precompute import run_api
from prefcache.data.options import BAD_ROW_POLICIES, TRUNCATIONS
from prefcache.losses.registry import F_DIVERGENCES
from prefcache.model.policy import FINETUNES
from prefcache.training.config import OPTIMIZERS, SCHEDULERS, TrainConfig


@click.command("train")
@config_option
@click.option("--data", required=True, help="Training preference data (.jsonl/.json/.parquet/.csv, a datasets folder or a Hub dataset id).")
@data_options(eval_split=True)
@click.option("--cache", default=None, help="Reference cache from `prefcache precompute` (not needed for the reference-free losses orpo, simpo, sft).")
@click.option("--out", required=True, help="Run directory: logs/, checkpoints/, pairs.parquet, run.json.")
@click.option("--model", default=None, help="Policy's starting weights: HF folder, .gguf or Hub id [default: embedded SmolLM2-135M-Instruct].")
@revision_option
@click.option("--adapter", default=None, help="Starting PEFT adapter, folder or Hub id (e.g. your SFT LoRA), trained further.")
@click.option("--loss", default="sigmoid", show_default=True, help="Loss name(s), comma-separated: sigmoid, ipo, simpo, sigmoid,sft ...; kto or apo_zero_unpaired alone, with an unpaired cache.")
@click.option("--loss-weights", default=None, help="Weights of the losses, comma-separated [default: 1 each].")
@click.option("--beta", type=float, default=0.1, show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True, help="cDPO / robust / exo label noise ε.")
@click.option("--ld-alpha", type=float, default=None, help="LD-DPO: weight of the tokens past the shorter completion.")
@click.option("--desirable-weight", type=float, default=1.0, show_default=True, help="kto: weight of desirable examples.")
@click.option("--undesirable-weight", type=float, default=1.0, show_default=True, help="kto: weight of undesirable examples.")
@click.option("--simpo-gamma", type=float, default=0.5, show_default=True, help="SimPO target reward margin.")
@click.option("--discopop-tau", type=float, default=0.05, show_default=True, help="DiscoPOP temperature.")
@click.option("--use-weighting", is_flag=True,
              help="WPO: weight each pair by the policy's own per-token probability of both completions (arXiv:2406.11827). "
                   "Costs one more log-sum-exp over the vocabulary per completion token (measured: ~10% slower steps, "
                   "SmolLM2-135M on CPU).")
@click.option("--f-divergence", type=click.Choice(F_DIVERGENCES), default="reverse_kl", show_default=True,
              help="f-DPO divergence (arXiv:2309.16240); reverse_kl is DPO.")
@click.option("--f-alpha", type=float, default=0.5, show_default=True, help="α of --f-divergence alpha_divergence.")
@click.option("--finetune", type=click.Choice(FINETUNES), default="auto", show_default=True,
              help="auto: the policy that made the cache (qlora on a 4-bit cache, else lora); lora: LoRA on all "
                   "linear layers; qlora: LoRA on a 4-bit NF4 base; full: every weight.")
@click.option("--lora-r", type=int, default=16, show_default=True)
@click.option("--lora-alpha", type=float, default=None, help="[default: 2 x lora-r]")
@click.option("--lora-dropout", type=float, default=0.0, show_default=True)
@click.option("--lora-target", default="all-linear", show_default=True, help="all-linear or module names, e.g. q_proj,v_proj.")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=4, show_default=True, help="Pairs per micro-batch per process.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 5e-5 lora/qlora, 5e-6 full].")
@click.option("--scheduler", type=click.Choice(SCHEDULERS), default="cosine", show_default=True)
@click.option("--warmup-ratio", type=float, default=0.1, show_default=True)
@click.option("--warmup-steps", type=int, default=None, help="Warm-up steps (overrides --warmup-ratio).")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="Clip gradients to this norm (0: no clipping).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True,
              help="adamw8bit / paged_adamw8bit: bitsandbytes' 8-bit optimizer states.")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True,
              help="Recompute each layer's activations in backward: the lean default (SmolLM2-135M, batch 4: "
                   "~half the peak memory) for ~30% more time per step; --no-gradient-checkpointing for speed.")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast on GPU (ignored on CPU).")
@click.option("--max-length", type=int, default=None, help="Tokens per prompt+completion [default: the cache's].")
@click.option("--truncation", type=click.Choice(TRUNCATIONS), default=None, help="[default: the cache's]")
@click.option("--on-bad-row", type=click.Choice(BAD_ROW_POLICIES), default="fail", show_default=True)
@click.option("--eval-data", default=None, help="Held-out preference data, scored at step 0, every --eval-every and at the end.")
@click.option("--eval-cache", default=None, help="Reference cache of --eval-data [default: --cache].")
@click.option("--eval-fraction", type=float, default=0.0, help="Hold out this share of the training ids instead.")
@click.option("--eval-every", type=int, default=None, help="Evaluate every N steps.")
@click.option("--eval-batch-size", type=int, default=None, help="[default: --batch-size]")
@click.option("--save-every", type=int, default=None, help="Checkpoint every N steps (the last step is always saved).")
@click.option("--log-every", type=int, default=1, show_default=True, help="Log metrics and per-example rows every N steps.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto.")
@click.option("--chunk-size", type=int, default=256, show_default=True, help="Completion positions per output-head chunk: memory (2 x chunk x vocab x 4 bytes in backward) vs speed.")
@click.option("--flush-every", type=int, default=50, show_default=True, help="Logged steps buffered per new log file.")
@click.option("--prefix-sharing/--no-prefix-sharing", default=None,
              help="One packed [prompt | chosen | rejected] row per pair, the prompt computed once [default: as "
                   "the cache was made, so step-0 rewards are exactly 0; no cache: on].")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Batches of pairs of similar length (seeded, resumable): less padding.")
@click.option("--report-to", default="none", show_default=True,
              help="Experiment trackers besides the Parquet logs, comma-separated: none, tensorboard, wandb, trackio "
                   "(optional extras; TensorBoard events go to OUT/tensorboard, WANDB_MODE=offline works).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_cmd(no_progress, max_grad_norm, **options):
    """Train a policy with DPO (or another preference loss) against a precomputed reference cache.

    Only the policy is loaded; the reference log-probs come from --cache, joined by example id,
    after checking that the cache was made with this tokenizer, chat template, max length and
    truncation. Logs go to OUT/logs/*.parquet, checkpoints to OUT/checkpoints/step-NNNNNN/ (a
    PEFT adapter, or full weights, plus the tokenizer and the state --resume needs).

    \b
    Example:
      prefcache precompute --data prefs.jsonl --out ref-cache
      prefcache train --data prefs.jsonl --cache ref-cache --out run1 --max-steps 200 --save-every 50
      prefcache train --data prefs.jsonl --cache ref-cache --out run1 --max-steps 200 --resume
      prefcache train --config run1/config.yaml --out run1-again   (run1's options, one changed)
    Reference-free, no cache:  prefcache train --data prefs.jsonl --out run2 --loss simpo --beta 2
    Data-parallel:             torchrun --nproc-per-node 2 -m prefcache train --data ... --cache ... --out run3
    """
    run_api(preflight.train, options)  # refusals that need no model, before torch loads
    from prefcache.training.loop import train  # torch

    config = run_api(TrainConfig, progress=not no_progress, max_grad_norm=max_grad_norm or None, **options)
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
