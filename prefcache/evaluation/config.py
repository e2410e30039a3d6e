"""prefcache.evaluation.config: what ``prefcache eval`` and ``prefcache score`` do, each option declared once."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.options import (
    POSITIVE,
    Range,
    _str_names,
    check_device,
    check_options,
    check_revision,
    option,
)
from prefcache.data.options import BAD_ROW_POLICIES, DataOptions
from prefcache.model.load import QUANTIZATIONS

_CHECKPOINTS = ("Checkpoint folders, names of checkpoints of --run, run folders (all their checkpoints), plain model "
                "folders or Hub ids (with --out), or `base`.")
_RUN = "Run folder: reads run.json, writes evals/{}."
_OUT = "Folder for results when there is no run (plain models, Hub ids): OUT/evals/{} (created)."


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

    checkpoints: tuple[str, ...] = option(help=_CHECKPOINTS, argument=True)
    tasks: tuple[str, ...] = option(help="lm-eval task names, comma-separated (globs allowed).")
    run: str | None = option(None, _RUN.format(""), default_text="the checkpoints' run")
    model: str | None = option(None, "Base model (HF folder, .gguf or Hub id).", default_text="the run's")
    base: bool = option(True, "Also evaluate the base model (checkpoint 'base').")
    include_path: tuple[str, ...] = option((), "Folder of task YAMLs (repeatable); relative data_files are read "
                                           "relative to each YAML.", multiple=True)
    limit: int | None = option(None, "Documents per task (quick checks).", range=POSITIVE, default_text="all")
    num_fewshot: int | None = option(None, "Few-shot examples.", range=Range(0), default_text="the task's")
    batch_size: int = option(8, "Documents per forward pass.", range=POSITIVE)
    quantize: str | None = option(None, "Precision of the weights.", choices=QUANTIZATIONS, default_text="the run's")
    device: str = option("auto", "cpu, cuda, cuda:1, or auto.")
    revision: str | None = option(None, "Hub revision (branch, tag or commit) when --model is a Hub id; or write "
                                        "ID@REV.")
    out: str | None = option(None, _OUT.format(""))

    def __post_init__(self):
        for name in ("checkpoints", "tasks", "include_path"):
            object.__setattr__(self, name, _str_names(getattr(self, name)))
        if not self.tasks:
            raise ValueError("no tasks given: pass lm-eval task names, e.g. tasks='hellaswag,arc_easy'")
        if not self.checkpoints and not self.base:
            raise ValueError("nothing to evaluate: give checkpoints, or base=True")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        check_options(self)
        check_device(self.device)
        check_revision(self.model, self.revision)


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
    fsdp: under torchrun, each checkpoint sharded across the ranks (each rank scores its share with or without it).
    revision, out: as for :class:`EvalConfig`; split, data_config, columns, *_template: as for
        :class:`PrecomputeConfig` (they must be the ones the cache was made with).
    """

    checkpoints: tuple[str, ...] = option(help=_CHECKPOINTS, argument=True)
    cache: str = option(help="Reference cache holding the held-out pairs (the reference is never loaded).")
    data: str = option(help="Held-out preference data (any format precompute reads).")
    run: str | None = option(None, _RUN.format(" and logs/"), default_text="the checkpoints' run")
    model: str | None = option(None, "Base model (HF folder, .gguf or Hub id).", default_text="the run's")
    base: bool = option(False, "Also score the base model (checkpoint 'base'; rewards ~0 if it made the cache).")
    beta: float | None = option(None, "Reward scale.", range=POSITIVE, default_text="the run's beta, else 0.1")
    batch_size: int = option(8, "Pairs per forward pass.", range=POSITIVE)
    on_bad_row: str = option("fail", "fail: stop and list bad rows; skip: score the rest.", choices=BAD_ROW_POLICIES)
    quantize: str | None = option(None, "Precision of the weights.", choices=QUANTIZATIONS, default_text="the run's")
    device: str = option("auto", "cpu, cuda, cuda:1, or auto.")
    chunk_size: int = option(512, "Completion positions per output-head chunk.", range=POSITIVE)
    out: str | None = option(None, _OUT.format(", OUT/logs/"))
    fsdp: bool = option(False, "Under torchrun: shard each checkpoint's model across the ranks with FSDP2 (each "
                        "rank holds 1/N of the weights); each rank scores its share of the pairs either way.")

    def __post_init__(self):
        super().__post_init__()  # the data options
        object.__setattr__(self, "checkpoints", _str_names(self.checkpoints))
        if self.fsdp and self.quantize in ("4bit", "8bit"):
            raise ValueError(f"--fsdp with --quantize {self.quantize} is not supported: FSDP shards float weights; "
                             "use --quantize bf16 (or fp32) with --fsdp")
        if not self.checkpoints and not self.base:
            raise ValueError("nothing to score: give checkpoints, or base=True")
        check_options(self, ScoreConfig)
        check_device(self.device)


def check_pairs_cache(cache) -> None:
    """``score`` measures pairs: refuse an unpaired (KTO) cache in words that say so, before any model loads."""
    from prefcache.cache.store import CacheError, read_metadata  # pyarrow: not for --help

    if cache is not None and read_metadata(cache).get("kind") == "unpaired":
        raise CacheError(f"--cache {cache} is an unpaired (KTO) cache: scoring unpaired runs and examples is not "
                         "supported yet (score measures pairs: held-out pairs and a cache of pairs, made by "
                         "prefcache precompute without --unpaired)")
