"""prefcache.evaluation.config."""

from __future__ import annotations

from dataclasses import dataclass

from prefcache.core.options import _choice, _positive, _str_names, check_device
from prefcache.data.options import BAD_ROW_POLICIES, DataOptions
from prefcache.model.load import QUANTIZATIONS


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
