"""Experiment trackers (``train --report-to``): TensorBoard, Weights & Biases, Trackio.

The run's Parquet logs stay the source of truth; a tracker gets a copy of each logged step under the
metric names users know from TRL (``loss``, ``rewards/chosen``, ``learning_rate``, ``eval_loss``, ...).
Like transformers' own callbacks, the sinks show them as ``train/<name>`` and ``eval/<name>``.
Each tracker is an optional extra (``pip install prefcache[tensorboard]`` / ``[wandb]`` / ``[trackio]``),
imported only when asked for. Offline use: TensorBoard writes event files to ``RUN/tensorboard``;
``WANDB_MODE=offline`` keeps W&B runs on disk; Trackio is local by default.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # tracker -> module to import

# prefcache step-log column -> TRL's metric name. Columns not named here (kl, tokens_per_s, ...) keep theirs.
TRL_NAMES = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
             "rewards_margins": "rewards/margins", "rewards_accuracies": "rewards/accuracies",
             "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected", "lr": "learning_rate"}
_NOT_METRICS = {"step", "split", "epoch", "n", "time_s"}


def parse_report_to(value) -> tuple[str, ...]:
    """'tensorboard,wandb' / ['wandb'] / 'none' / None -> validated tuple of tracker names (() for none)."""
    names = value.split(",") if isinstance(value, str) else list(value or ())
    names = tuple(n.strip() for n in names if n and n.strip())
    if unknown := [n for n in names if n not in TRACKERS]:
        raise ValueError(f"report_to: unknown tracker {', '.join(unknown)}; choose from {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to: 'none' cannot be combined with other trackers, got {list(names)}")
    return tuple(n for n in names if n != "none")


def check_installed(names) -> None:
    """Refuse a tracker whose package is missing now, with the other options, not after the model loaded."""
    import importlib.util

    for name in names:
        module = EXTRAS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a module in sys.modules without a spec (a test's stand-in) is there
            found = module in sys.modules
        if not found:
            raise ValueError(f"--report-to {name} needs the {module} package: pip install 'prefcache[{name}]'")


def trl_metrics(row: dict, split: str) -> dict[str, float]:
    """A step-log row -> {TRL metric name: value}, ``eval_`` prefixed for the eval split."""
    prefix = "eval_" if split == "eval" else ""
    out = {f"{prefix}{TRL_NAMES.get(k, k)}": float(v) for k, v in row.items()
           if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)}
    if "epoch" in row:
        out["epoch"] = float(row["epoch"])
    return out


def _sink_name(name: str) -> str:
    """transformers' rewrite_logs: eval_x -> eval/x, epoch stays, the rest -> train/x."""
    if name.startswith("eval_"):
        return "eval/" + name[len("eval_"):]
    return name if name == "epoch" else "train/" + name


class Trackers:
    """The trackers of one run (rank 0 only). ``log`` and ``close`` are no-ops with none."""

    def __init__(self, names, run_dir: str | os.PathLike, config: dict | None = None, resume_step: int | None = None):
        self.names = parse_report_to(names)
        self.sinks = []
        run_dir = Path(run_dir)
        for name in self.names:
            try:
                self.sinks.append(getattr(self, f"_open_{name}")(run_dir, config or {}, resume_step))
            except ImportError as e:
                raise ValueError(f"--report-to {name} needs the {EXTRAS[name]} package: "
                                 f"pip install 'prefcache[{name}]' ({e})") from e

    def log(self, row: dict, *, step: int, split: str) -> None:
        if not self.sinks:
            return
        metrics = {_sink_name(k): v for k, v in trl_metrics(row, split).items()}
        for sink in self.sinks:
            sink.log(metrics, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    @staticmethod
    def _open_tensorboard(run_dir: Path, config: dict, resume_step):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        # purge_step: a resumed run drops the events logged after its checkpoint, as the Parquet logs do.
        writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                               purge_step=resume_step + 1 if resume_step is not None else None)
        return _Sink(lambda m, step: [writer.add_scalar(k, v, step) for k, v in m.items()],
                     lambda: writer.close())

    @staticmethod
    def _open_wandb(run_dir: Path, config: dict, resume_step):
        import wandb

        run = wandb.init(project=os.environ.get("WANDB_PROJECT", "prefcache"), name=run_dir.name,
                         dir=str(run_dir), config=config, resume="allow" if resume_step is not None else None)
        return _Sink(lambda m, step: run.log(m, step=step), run.finish)

    @staticmethod
    def _open_trackio(run_dir: Path, config: dict, resume_step):
        import trackio

        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "prefcache"), name=run_dir.name, config=config,
                     resume="allow" if resume_step is not None else "never")
        return _Sink(lambda m, step: trackio.log(m, step=step), trackio.finish)


class _Sink:
    def __init__(self, log, close):
        self.log, self.close = log, close
