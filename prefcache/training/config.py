"""Options of each command as frozen dataclasses, validated on construction.

The CLI builds one of these and calls the same function a Python user calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.options import _choice, _in_range, _names, _positive, check_device
from prefcache.data.options import BAD_ROW_POLICIES, TRUNCATIONS, DataOptions
from prefcache.losses.registry import PAIR_LOSSES as LOSSES
from prefcache.losses.registry import UNPAIRED_LOSSES, check_loss_options
from prefcache.model.policy import FINETUNES, lora_alpha_of
from prefcache.training.schedule import SCHEDULES
from prefcache.training.trackers import parse_report_to

SCHEDULERS = SCHEDULES  # prefcache.training.schedule implements them
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")




@dataclass(frozen=True)
class TrainConfig(DataOptions):
    """What ``prefcache train`` does.

    data: training preference data (same formats as precompute). cache: the reference cache made from it
    (needed unless every loss is reference-free: orpo, simpo, sft). out: the run directory.
    model: the policy's starting weights (HF folder or .gguf; None = the embedded SmolLM2-135M-Instruct);
    it should be the reference the cache was made with, else the implicit rewards do not start at zero.
    loss / loss_weights: names from ``prefcache.losses.LOSSES`` ("sigmoid" or "sigmoid,sft") and their
    weights (default 1 each). beta, label_smoothing, ld_alpha, simpo_gamma, bco/discopop options: passed
    to the losses that take them.
    finetune: lora (LoRA on all linear layers), qlora (LoRA on a 4-bit NF4 base), full (every weight).
    lr: None = 5e-5 for lora/qlora, 5e-6 for full. batch_size: pairs per micro-batch per process;
    grad_accum micro-batches per optimizer step, so a step sees batch_size * grad_accum * world_size pairs.
    max_steps: optimizer steps (overrides epochs). max_length / truncation: None = the cache's values.
    eval_data / eval_cache: held-out pairs and their reference cache (default: ``cache``);
    eval_fraction: hold out that share of the training ids instead (chosen by id hash, not row order).
    save_every / eval_every / log_every: in optimizer steps (eval also runs before the first step and at
    the end). flush_every: logged steps buffered before a new log part file is written.
    gradient_checkpointing: recompute each decoder layer in backward (on by default: the memory-lean choice).
    prefix_sharing: one packed ``[prompt | chosen | rejected]`` row per pair, the prompt computed (and its
    gradient taken) once; None = the cache's path (``prefix_sharing`` in its metadata), so the step-0 rewards
    are 0; a different choice is allowed, with a warning (values agree to ~1e-5 per sequence, not bit-exactly).
    group_by_length: batches of similar length (seeded mega-batches sorted by length), less padding.
    revision, split, data_config, columns, *_template: as for :class:`PrecomputeConfig` (the cache must have
    been made with the same columns and templates); eval_split: the split of ``eval_data``.
    """

    data: str
    out: str
    cache: str | None = None
    model: str | None = None
    adapter: str | None = None  # a starting (e.g. SFT) LoRA adapter, trained further
    loss: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    ld_alpha: float | None = None
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False  # WPO: weight each pair by the policy's own probability of both completions
    f_divergence: str = "reverse_kl"  # f-DPO: reverse_kl (DPO), forward_kl, js_divergence, alpha_divergence
    f_alpha: float = 0.5  # alpha_divergence's α
    desirable_weight: float = 1.0  # kto / apo_zero_unpaired: weight of desirable (label True) examples
    undesirable_weight: float = 1.0
    finetune: str = "auto"  # qlora on a 4-bit cache, else lora: the policy starts as the cache's reference
    lora_r: int = 16
    lora_alpha: float | None = None  # None = 2 * lora_r
    lora_dropout: float = 0.0
    lora_target: str = "all-linear"  # or comma-separated module names, e.g. "q_proj,v_proj"
    max_steps: int | None = None
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    gradient_checkpointing: bool = True  # the lean default: ~half the activation memory for ~30% more time
    bf16: bool = True  # bf16 autocast when training on a GPU; ignored on CPU
    max_length: int | None = None
    truncation: str | None = None
    on_bad_row: str = "fail"
    eval_data: str | None = None
    eval_cache: str | None = None
    eval_fraction: float = 0.0
    eval_every: int | None = None
    eval_batch_size: int | None = None  # None = batch_size
    save_every: int | None = None
    log_every: int = 1
    flush_every: int = 50
    resume: bool = False
    seed: int = 42
    device: str = "auto"
    chunk_size: int = 256  # logits + their softmax in backward: 2 x 50 MB (1024: ~190 MB more peak, measured)
    progress: bool = True
    prefix_sharing: bool | None = None  # None: as the cache was made (no cache: on)
    group_by_length: bool = True
    eval_split: str | None = None
    report_to: tuple[str, ...] = ()  # experiment trackers: tensorboard, wandb, trackio ("none" or () = only Parquet)

    def __post_init__(self):
        super().__post_init__()  # the data options
        object.__setattr__(self, "report_to", parse_report_to(self.report_to))

        loss = _names(self.loss)
        object.__setattr__(self, "loss", loss)
        if self.loss_weights is not None:
            weights = tuple(float(w) for w in _names(self.loss_weights))
            object.__setattr__(self, "loss_weights", weights)
            if len(weights) != len(loss):
                raise ValueError(f"{len(loss)} loss name(s) {list(loss)} but {len(weights)} loss weight(s)")
        if unknown := [n for n in loss if n not in LOSSES and n not in UNPAIRED_LOSSES]:
            raise ValueError(f"unknown loss {', '.join(unknown)}; choose from {', '.join((*LOSSES, *UNPAIRED_LOSSES))}")
        if set(loss) & set(UNPAIRED_LOSSES) and len(loss) > 1:
            raise ValueError(f"{', '.join(UNPAIRED_LOSSES)} train on unpaired data and cannot be combined: {list(loss)}")
        if not loss or len(set(loss)) != len(loss):
            raise ValueError(f"loss must name each loss once, got {list(loss)}")
        if loss[0] not in UNPAIRED_LOSSES:
            check_loss_options(loss, f_divergence=self.f_divergence, use_weighting=self.use_weighting,
                               label_smoothing=self.label_smoothing)
        for name in ("desirable_weight", "undesirable_weight"):
            _positive(name, getattr(self, name))
        if self.cache is None and (needs := [n for n in loss if n in UNPAIRED_LOSSES or LOSSES[n].needs_ref]):
            free = [n for n, s in LOSSES.items() if not s.needs_ref]
            raise ValueError(f"loss {', '.join(needs)} needs the reference cache: pass cache (--cache DIR); "
                             f"losses that need none: {', '.join(free)}")
        _choice("finetune", self.finetune, FINETUNES)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        if self.truncation is not None:
            _choice("truncation", self.truncation, TRUNCATIONS)
        for name in ("lora_r", "epochs", "batch_size", "grad_accum", "max_steps", "max_length", "eval_every",
                     "eval_batch_size", "save_every", "log_every", "flush_every", "chunk_size", "beta", "lr",
                     "lora_alpha"):
            _positive(name, getattr(self, name))
        if self.max_length is not None and self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one prompt token and one completion token)")
        check_device(self.device)
        # Every float option finite and in range: a NaN beta or an infinite lr trains NaN weights.
        # label_smoothing: [0, 0.5], the range TRL documents (robust and exo_pair check their own bounds).
        _in_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        _in_range("weight_decay", self.weight_decay, 0.0)
        _in_range("simpo_gamma", self.simpo_gamma, 0.0)
        _positive("discopop_tau", self.discopop_tau)
        _positive("max_grad_norm", self.max_grad_norm)
        if self.warmup_steps is not None:
            _in_range("warmup_steps", self.warmup_steps, 0)
        if self.loss_weights is not None:
            for w in self.loss_weights:
                _in_range("each loss weight", w, 0.0)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_data:
            raise ValueError("give eval_data or eval_fraction, not both")
        if self.eval_cache and not self.eval_data:
            raise ValueError("eval_cache needs eval_data (the held-out pairs it was made from)")
        if self.ld_alpha is not None and not 0 <= self.ld_alpha <= 1:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr is None:  # auto resolves to lora or qlora, never full
            object.__setattr__(self, "lr", 5e-6 if self.finetune == "full" else 5e-5)
        if self.lora_alpha is None:
            object.__setattr__(self, "lora_alpha", lora_alpha_of(self.lora_r))






