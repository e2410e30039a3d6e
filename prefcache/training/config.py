"""What ``prefcache train`` does: one frozen dataclass, :class:`TrainConfig`, made of option groups.

Each group (loss, policy, optimizer and schedule, eval, run) declares its options once, as fields with
their help, range and choices (:func:`prefcache.core.options.option`), and validates them in its own
``__post_init__``; :class:`TrainConfig` combines them (access stays flat: ``cfg.beta``, ``cfg.lora_r``) and
checks the rules that span groups. The CLI's ``prefcache train`` options are built from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from prefcache.core.options import POSITIVE, Range, _names, check_device, check_options, given, option
from prefcache.data.options import BAD_ROW_POLICIES, TRUNCATIONS, DataOptions
from prefcache.losses.registry import (
    F_DIVERGENCES,
    LOSSES,
    UNPAIRED_LOSSES,
    check_loss_names,
    check_loss_options,
)
from prefcache.model.policy import FINETUNES, lora_alpha_of
from prefcache.training.schedule import SCHEDULES
from prefcache.training.trackers import TRACKERS, check_installed, parse_report_to

SCHEDULERS = SCHEDULES  # prefcache.training.schedule implements them
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
_LOSS_OPTIONS = ("label_smoothing", "ld_alpha", "simpo_gamma", "discopop_tau", "f_alpha", "desirable_weight",
                 "undesirable_weight")
UNIT = Range(0, 1, high_open=True)  # a share or a probability: [0, 1)


def _post_init_chain(self, cls) -> None:
    """Run the next group's ``__post_init__`` in the MRO (each group validates its own fields)."""
    nxt = super(cls, self)
    if hasattr(nxt, "__post_init__"):
        nxt.__post_init__()
    check_options(self, cls)


@dataclass(frozen=True, kw_only=True)
class LossOptions:
    """The loss and its options, passed to the losses that take them (:mod:`prefcache.losses`)."""

    loss: tuple[str, ...] = option(("sigmoid",), "Loss name(s), comma-separated: sigmoid, ipo, simpo, sigmoid,sft ...; "
                                   "kto or apo_zero_unpaired alone, with an unpaired cache. All: " + ", ".join(LOSSES),
                                   metavar="NAME[,NAME...]")
    loss_weights: tuple[float, ...] | None = option(None, "Weights of the losses, comma-separated.", range=Range(0.0),
                                                    default_text="1 each", metavar="W[,W...]")
    beta: float = option(0.1, "β: the KL penalty's strength (reward scale).", range=POSITIVE)
    label_smoothing: float = option(0.0, "cDPO / robust / exo label noise ε.", range=Range(0.0, 0.5))
    ld_alpha: float | None = option(None, "LD-DPO: weight of the tokens past the shorter completion.", range=Range(0, 1))
    simpo_gamma: float = option(0.5, "SimPO target reward margin.", range=Range(0.0))
    discopop_tau: float = option(0.05, "DiscoPOP temperature.", range=POSITIVE)
    use_weighting: bool = option(False, "WPO: weight each pair by the policy's own per-token probability of both "
                                 "completions (arXiv:2406.11827). Costs one more log-sum-exp over the vocabulary per "
                                 "completion token (measured: ~10% slower steps, SmolLM2-135M on CPU).")
    f_divergence: str = option("reverse_kl", "f-DPO divergence (arXiv:2309.16240); reverse_kl is DPO.",
                               choices=F_DIVERGENCES)
    f_alpha: float = option(0.5, "α of --f-divergence alpha_divergence (refused with the others).", range=Range())
    desirable_weight: float = option(1.0, "kto / apo_zero_unpaired: weight of desirable examples.", range=POSITIVE)
    undesirable_weight: float = option(1.0, "kto / apo_zero_unpaired: weight of undesirable examples.", range=POSITIVE)

    def __post_init__(self):
        loss = _names(self.loss)
        object.__setattr__(self, "loss", loss)
        if self.loss_weights is not None:
            weights = tuple(float(w) for w in _names(self.loss_weights))
            object.__setattr__(self, "loss_weights", weights)
            if len(weights) != len(loss):
                raise ValueError(f"{len(loss)} loss name(s) {list(loss)} but {len(weights)} loss weight(s)")
        _post_init_chain(self, LossOptions)
        check_loss_names(loss)
        check_loss_options(loss, f_divergence=self.f_divergence, use_weighting=self.use_weighting,
                           label_smoothing=self.label_smoothing, given=given(self, _LOSS_OPTIONS))


def loss_settings(cfg) -> dict:
    """What a run optimises: the loss, β and every loss option (:class:`LossOptions`' fields), as JSON values
    (lists for tuples). Each checkpoint records them, and a resume that changes one is refused."""
    return {f.name: list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v for f in fields(LossOptions)}


@dataclass(frozen=True, kw_only=True)
class PolicyOptions:
    """The policy being trained: its weights, how they are fine-tuned, and how its forward pass runs."""

    model: str | None = option(None, "Policy's starting weights: HF folder, .gguf or Hub id; it should be the "
                               "reference the cache was made with.", default_text="embedded SmolLM2-135M-Instruct")
    adapter: str | None = option(None, "Starting PEFT adapter, folder or Hub id (e.g. your SFT LoRA), trained further.")
    finetune: str = option("auto", "auto: the policy that made the cache (qlora on a 4-bit cache, else lora); lora: "
                           "LoRA on all linear layers; qlora: LoRA on a 4-bit NF4 base; full: every weight.",
                           choices=FINETUNES)
    lora_r: int = option(16, "LoRA rank.", range=POSITIVE)
    lora_alpha: float | None = option(None, "LoRA scale α.", range=POSITIVE, default_text="2 x lora-r")
    lora_dropout: float = option(0.0, "Dropout on the LoRA inputs.", range=UNIT)
    lora_target: str = option("all-linear", "all-linear or module names, e.g. q_proj,v_proj.")
    train_vision: bool = option(False, "Vision-language models: train the vision tower and projector too (LoRA on "
                                "their linear layers, or their weights under --finetune full); by default only the "
                                "language model trains.")
    gradient_checkpointing: bool = option(True, "Recompute each layer's activations in backward: the lean default "
                                          "(SmolLM2-135M, batch 4: ~half the peak memory) for ~30% more time per "
                                          "step; --no-gradient-checkpointing for speed.")
    bf16: bool = option(True, "bf16 autocast on GPU (ignored on CPU).")
    fsdp: bool = option(False, "Under torchrun: shard the policy, its gradients and optimizer state across the "
                        "processes (PyTorch FSDP2, one unit per decoder layer; checkpoints in PyTorch's distributed "
                        "format too, resumable on another number of processes). One process: trains unsharded. "
                        "qlora: the 4-bit base is sharded too (tested on CPU; not yet run on CUDA).")
    chunk_size: int = option(256, "Completion positions per output-head chunk: memory (2 x chunk x vocab x 4 bytes in "
                             "backward; 1024: ~190 MB more peak, measured) vs speed.", range=POSITIVE)
    prefix_sharing: bool | None = option(None, "One packed [prompt | chosen | rejected] row per pair, the prompt "
                                         "computed once.", default_text="as the cache was made, so step-0 rewards "
                                         "are exactly 0; no cache: on")

    def __post_init__(self):
        _post_init_chain(self, PolicyOptions)
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", lora_alpha_of(self.lora_r))


@dataclass(frozen=True, kw_only=True)
class OptimizerOptions:
    """Steps, batches, the optimizer and the learning-rate schedule."""

    max_steps: int | None = option(None, "Optimizer steps (overrides --epochs).", range=POSITIVE)
    epochs: int = option(1, "Passes over the training data.", range=POSITIVE)
    batch_size: int = option(4, "Pairs per micro-batch per process.", range=POSITIVE)
    grad_accum: int = option(1, "Micro-batches per optimizer step (a step sees batch-size x grad-accum x "
                             "processes pairs).", range=POSITIVE)
    lr: float | None = option(None, "Peak learning rate.", range=POSITIVE, default_text="5e-5 lora/qlora, 5e-6 full")
    scheduler: str = option("cosine", "Learning-rate decay after warm-up.", choices=SCHEDULERS)
    warmup_ratio: float = option(0.1, "Share of the steps spent warming up.", range=UNIT)
    warmup_steps: int | None = option(None, "Warm-up steps (overrides --warmup-ratio).", range=Range(0))
    weight_decay: float = option(0.0, "AdamW weight decay.", range=Range(0.0))
    max_grad_norm: float | None = option(1.0, "Clip gradients to this norm (0: no clipping).", range=POSITIVE,
                                         cli_none=0.0)
    optimizer: str = option("adamw", "adamw8bit / paged_adamw8bit: bitsandbytes' 8-bit optimizer states.",
                            choices=OPTIMIZERS)
    group_by_length: bool = option(True, "Batches of pairs of similar length (seeded, resumable): less padding.")
    seed: int = option(42, "Seed of the data order, dropout and LoRA's initial weights.")

    def __post_init__(self):
        _post_init_chain(self, OptimizerOptions)


@dataclass(frozen=True, kw_only=True)
class EvalOptions:
    """Held-out pairs, scored at step 0, every ``eval_every`` steps and at the end."""

    eval_data: str | None = option(None, "Held-out preference data, scored at step 0, every --eval-every and at the end.")
    eval_cache: str | None = option(None, "Reference cache of --eval-data.", default_text="--cache")
    eval_split: str | None = option(None, "Split of --eval-data (a Hub dataset or DatasetDict).")
    eval_fraction: float = option(0.0, "Hold out this share of the training ids instead (chosen by id hash).",
                                  range=UNIT)
    eval_every: int | None = option(None, "Evaluate every N steps.", range=POSITIVE)
    eval_batch_size: int | None = option(None, "Pairs per eval forward pass.", range=POSITIVE,
                                         default_text="--batch-size")

    def __post_init__(self):
        _post_init_chain(self, EvalOptions)
        if self.eval_fraction and self.eval_data:
            raise ValueError("give eval_data or eval_fraction, not both")
        if self.eval_cache and not self.eval_data:
            raise ValueError("eval_cache needs eval_data (the held-out pairs it was made from)")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where the run goes, how often it saves and logs, and the one-off action of resuming it."""

    save_every: int | None = option(None, "Checkpoint every N steps (the last step is always saved).", range=POSITIVE)
    log_every: int = option(1, "Log metrics and per-example rows every N steps.", range=POSITIVE)
    flush_every: int = option(50, "Logged steps buffered per new log file.", range=POSITIVE)
    resume: bool = option(False, "Continue the run in --out from its latest checkpoint (a one-off action: not "
                          "saved in config.yaml).", replay=False)
    device: str = option("auto", "cpu, cuda, cuda:1, or auto.")
    progress: bool = option(True, "Show a progress bar.")
    report_to: tuple[str, ...] = option((), "Experiment trackers besides the Parquet logs, comma-separated: "
                                        f"{', '.join(TRACKERS)} (optional extras; TensorBoard events go to "
                                        "OUT/tensorboard, WANDB_MODE=offline works).", default_text="none")

    def __post_init__(self):
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))
        _post_init_chain(self, RunOptions)
        check_device(self.device)
        check_installed(self.report_to)  # before any model loads or the run directory is made


@dataclass(frozen=True)
class TrainConfig(RunOptions, EvalOptions, OptimizerOptions, LossOptions, PolicyOptions, DataOptions):
    """What ``prefcache train`` does: the groups above, and the options that tie them together.

    data: training preference data (same formats as precompute). cache: the reference cache made from it
    (needed unless every loss is reference-free: orpo, simpo, sft). out: the run directory.
    max_length / truncation: None = the cache's values. on_bad_row: as for precompute.
    revision, split, data_config, columns, *_template: as for :class:`PrecomputeConfig` (the cache must have
    been made with the same columns and templates).
    """

    data: str = option(help="Training preference data (.jsonl/.json/.parquet/.csv, a datasets folder or a Hub "
                       "dataset id).")
    out: str = option(help="Run directory: logs/, checkpoints/, pairs.parquet, run.json, config.yaml.")
    cache: str | None = option(None, "Reference cache from `prefcache precompute` (not needed for the reference-free "
                               "losses orpo, simpo, sft).")
    max_length: int | None = option(None, "Tokens per prompt+completion.", range=POSITIVE, default_text="the cache's")
    truncation: str | None = option(None, "keep_start or keep_end.", choices=TRUNCATIONS, default_text="the cache's")
    on_bad_row: str = option("fail", "fail: stop and list bad rows; skip: train on the rest.", choices=BAD_ROW_POLICIES)

    def __post_init__(self):
        super().__post_init__()  # every group, then the data options
        check_options(self, TrainConfig)
        if self.cache is None and (needs := [n for n in self.loss if n in UNPAIRED_LOSSES or LOSSES[n].needs_ref]):
            free = [n for n, s in LOSSES.items() if not s.needs_ref]
            raise ValueError(f"loss {', '.join(needs)} needs the reference cache: pass cache (--cache DIR); "
                             f"losses that need none: {', '.join(free)}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one prompt token and one completion token)")
        if self.lr is None:  # auto resolves to lora or qlora, never full
            object.__setattr__(self, "lr", 5e-6 if self.finetune == "full" else 5e-5)
