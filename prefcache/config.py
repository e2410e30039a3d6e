"""Options of each command as frozen dataclasses, validated on construction.

The CLI builds one of these and calls the same function a Python user calls.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .columns import RowMapping, parse_columns
from .schedule import SCHEDULES
from .trackers import parse_report_to

QUANTIZATIONS = ("auto", "4bit", "8bit", "bf16", "fp16", "fp32")
TRUNCATIONS = ("keep_start", "keep_end")
BAD_ROW_POLICIES = ("fail", "skip")


def lora_alpha_of(r: int, alpha: float | None = None) -> float:
    """LoRA's alpha: the given one, else 2 x r (the scale alpha / r = 2, as in the QLoRA recipe)."""
    return alpha if alpha is not None else 2.0 * r


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _data_options(config) -> None:
    """Validate the column mapping and templates now (one clear line), and store columns as text."""
    columns = parse_columns(getattr(config, "columns", None))
    object.__setattr__(config, "columns", ",".join(f"{t}={c}" for t, c in columns) or None)
    RowMapping.of(config)


def _positive(name: str, value) -> None:
    # `nan <= 0` is False: without the isfinite check NaN (and inf) would pass as "positive"
    if value is not None and (not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")


def _in_range(name: str, value, low: float, high: float | None = None, *, high_open: bool = False) -> None:
    """A finite number in [low, high] ([low, high) with high_open; no upper bound with high None)."""
    ok = value is not None and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        upper = "" if high is None else f", {high}{')' if high_open else ']'}"
        span = f"[{low}{upper}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {'in ' if high is not None else ''}{span}, got {value}")


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: str) -> None:
    """Refuse a device name torch would reject only after the model loaded (e.g. 'tpu9', 'gpu')."""
    if not isinstance(device, str) or not DEVICE_PATTERN.match(device):
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Options shared by the commands that read preference data (precompute, train, score), declared once.

    revision: the Hub revision (branch, tag or commit) of a Hub ``model``. split / data_config: the split and
    subset of a Hub dataset or dataset folder. columns / *_template: the column mapping and prompt templates
    (:mod:`prefcache.columns`), validated on construction.
    """

    revision: str | None = None
    split: str | None = None
    data_config: str | None = None
    columns: str | None = None
    prompt_template: str | None = None
    chosen_template: str | None = None
    rejected_template: str | None = None

    def __post_init__(self):
        _data_options(self)


@dataclass(frozen=True)
class PrecomputeConfig(DataOptions):
    """What ``prefcache precompute`` does.

    data: preference data (JSONL/JSON/Parquet/CSV file or a ``datasets.save_to_disk`` folder).
    out: the cache directory (created, or extended when it already holds a matching cache).
    model: HF folder or .gguf file; None = the embedded SmolLM2-135M-Instruct.
    quantize: reference precision; ``auto`` = bf16 on a GPU, fp32 on CPU.
    revision: the Hub revision (branch, tag or commit) when ``model`` is a Hub id.
    split / data_config: the split and subset (``load_dataset(data, data_config, split=split)``) when
    ``data`` is a Hub dataset id (or a saved DatasetDict). columns / *_template: see :mod:`prefcache.columns`.
    max_length: tokens of prompt + completion kept per sequence.
    truncation: ``keep_start`` (TRL's default: the completion loses its tail) or ``keep_end``.
    batch_size: pairs per forward pass (2 x batch_size sequences, fewer after de-duplication).
    per_token: also store per-token log-prob lists.
    shard_size: pairs per Parquet shard; a crash loses at most one shard of work.
    chunk_size: completion positions projected through the output head at once.
    prefix_sharing: one packed row per prompt, its completions after it under a block mask (the prompt is
        computed once); off = two sequences per pair. Models that cannot take the mask fall back (said once).
    """

    data: str
    out: str
    model: str | None = None
    quantize: str = "auto"
    adapter: str | None = None
    max_length: int = 1024
    truncation: str = "keep_start"
    batch_size: int = 8
    per_token: bool = False
    on_bad_row: str = "fail"
    device: str = "auto"
    shard_size: int = 1024
    chunk_size: int = 512  # x 49k vocab x fp32 = 100 MB of logits at a time (2048: 400 MB)
    progress: bool = True
    prefix_sharing: bool = True
    unpaired: bool = False  # a KTO cache: each completion and its KL completion (prefcache.unpaired)
    kl_group_size: int = 8  # unpaired: KL completions rotate within groups of this many examples (TRL's batch)

    def __post_init__(self):
        super().__post_init__()  # the data options
        _choice("quantize", self.quantize, QUANTIZATIONS)
        _positive("kl_group_size", self.kl_group_size)
        _choice("truncation", self.truncation, TRUNCATIONS)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        check_device(self.device)
        for name in ("max_length", "batch_size", "shard_size", "chunk_size"):
            _positive(name, getattr(self, name))
        if self.max_length < 2:
            raise ValueError("max_length must be at least 2 (one prompt token and one completion token)")


FINETUNES = ("auto", "lora", "qlora", "full")
UNPAIRED_LOSSES = ("kto", "apo_zero_unpaired")  # losses on unpaired data (prefcache.kto), each used alone
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # f-DPO (losses.f_scores)
SCHEDULERS = SCHEDULES  # prefcache.schedule implements them
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def _names(value) -> tuple:
    """'a,b' or ['a', 'b'] -> ('a', 'b')."""
    if isinstance(value, str):
        value = value.split(",")
    return tuple(v.strip() if isinstance(v, str) else v for v in value if not (isinstance(v, str) and not v.strip()))


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
        from .losses import (  # torch: the registry says which names need a reference
            LOSSES,
            check_loss_options,
        )

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


def _str_names(value) -> tuple[str, ...]:
    """None, 'a,b', or a list of strings / paths -> ('a', 'b')."""
    return tuple(str(v) for v in _names(value or ()))


@dataclass(frozen=True)
class EvalConfig:
    """What ``prefcache eval`` does: lm-eval tasks on checkpoints of a run, and on its base model.

    checkpoints: checkpoint folders (``RUN/checkpoints/step-000100``), a checkpoint's name inside ``run``,
        a run folder (= all its checkpoints), or ``base``.
    tasks: lm-eval task names (``a,b`` or a list): built-in ones (their data must be reachable) or ones
        defined by YAMLs under ``include_path``.
    run: the run folder: run.json is read from it and results go to ``RUN/evals/``; default: the run
        the checkpoints belong to.
    model: the base model (HF folder or .gguf); default: the run's model (run.json), else the embedded one.
    base: also evaluate the base model (checkpoint ``base``), the baseline every checkpoint is compared to.
    include_path: folders of task YAMLs; a relative ``data_files`` path in them is read relative to the
        YAML's own folder (lm-eval alone reads it relative to the working directory).
    limit: documents per task (quick checks); None = all.
    quantize: precision of the loaded weights; None = the run's (a QLoRA run's base loads in 4-bit).
    revision: the Hub revision of ``model``. out: where results go when there is no run (plain model
        folders, Hub ids): ``OUT/evals/`` (created).
    """

    checkpoints: tuple[str, ...]
    tasks: tuple[str, ...]
    run: str | None = None
    model: str | None = None
    base: bool = True
    include_path: tuple[str, ...] = ()
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    quantize: str | None = None
    device: str = "auto"
    revision: str | None = None
    out: str | None = None

    def __post_init__(self):
        for name in ("checkpoints", "tasks", "include_path"):
            object.__setattr__(self, name, _str_names(getattr(self, name)))
        if not self.tasks:
            raise ValueError("no tasks given: pass lm-eval task names, e.g. tasks='hellaswag,arc_easy'")
        if not self.checkpoints and not self.base:
            raise ValueError("nothing to evaluate: give checkpoints, or base=True")
        for name in ("limit", "batch_size"):
            _positive(name, getattr(self, name))
        check_device(self.device)
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.quantize is not None:
            _choice("quantize", self.quantize, QUANTIZATIONS)


@dataclass(frozen=True)
class ScoreConfig(DataOptions):
    """What ``prefcache score`` does: implicit rewards of checkpoints on held-out pairs, against the cache.

    checkpoints: as for :class:`EvalConfig` (``base`` scores the base model: rewards ~0 when the cache was
        made by that model at that precision).
    cache: the reference cache holding the held-out pairs (the reference model is never loaded).
    data: the held-out preference data; it is tokenised as the cache says (max_length, truncation).
    beta: reward scale; None = the run's beta (run.json), else 0.1.
    base: also score the base model. Off by default: rewards are already relative to the reference.
    batch_size: pairs per forward pass.
    revision, out: as for :class:`EvalConfig`; split, data_config, columns, *_template: as for
        :class:`PrecomputeConfig` (they must be the ones the cache was made with).
    """

    checkpoints: tuple[str, ...]
    cache: str
    data: str
    run: str | None = None
    model: str | None = None
    base: bool = False
    beta: float | None = None
    batch_size: int = 8
    on_bad_row: str = "fail"
    quantize: str | None = None
    device: str = "auto"
    chunk_size: int = 512
    out: str | None = None

    def __post_init__(self):
        super().__post_init__()  # the data options
        object.__setattr__(self, "checkpoints", _str_names(self.checkpoints))
        if not self.checkpoints and not self.base:
            raise ValueError("nothing to score: give checkpoints, or base=True")
        for name in ("beta", "batch_size", "chunk_size"):
            _positive(name, getattr(self, name))
        check_device(self.device)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        if self.quantize is not None:
            _choice("quantize", self.quantize, QUANTIZATIONS)
