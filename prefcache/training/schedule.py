"""The learning-rate schedule: warm-up, then cosine, linear or constant, as a function of the step alone.

Two differences from ``transformers.get_scheduler``, both measured on short runs:
- warm-up step k (1-based) runs at k / warmup of the peak, so step 1 learns (transformers' step 1 runs
  at lr 0, and ``--max-steps 1`` trains nothing);
- the lr of a step is recomputed from (step, total steps) on ``--resume``, never read back from the
  saved scheduler, so extending a finished run (``--max-steps 5 --resume`` on a 4-step run) trains
  the new steps at a real lr instead of the finished schedule's 0.
With no warm-up the values equal transformers' (cosine and linear decay to the last step's
(total - 1) / total of the way, so the last step also learns).
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(done: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr for the step that follows ``done`` completed steps."""
    if done < warmup:
        return (done + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = (done - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULES)}, got {kind!r}")


def make_scheduler(optimizer, kind: str, *, warmup: int, total: int, peak_lr: float, done: int = 0):
    """A LambdaLR over ``optimizer`` whose next step is step ``done + 1`` (``done`` > 0 on resume).

    The peak lr is set on every parameter group (a resumed optimizer state carries the old run's lr).
    """
    import torch

    for group in optimizer.param_groups:
        group["initial_lr"] = peak_lr
        group["lr"] = peak_lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda d: lr_factor(d, total, warmup, kind))
    if done:
        scheduler.last_epoch = done
        lrs = [peak_lr * lr_factor(done, total, warmup, kind) for _ in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = lrs
    return scheduler
