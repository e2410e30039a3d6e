"""What a run directory holds, decided without loading torch: a refusal that needs no model is instant."""

from __future__ import annotations

import os
from pathlib import Path

from .checkpoint import list_checkpoints


def holds_run(out: str | os.PathLike) -> bool:
    """A run to protect: a checkpoint, or logged steps. (A start that failed before either is not one.)"""
    out = Path(out)
    return bool(list_checkpoints(out)) or any((out / "logs").glob("steps-*.parquet"))


def check_run_dir(out: str | os.PathLike, resume: bool) -> str | None:
    """Refuse a fresh run over an existing one, and a resume of nothing. Returns a notice to print
    (a resume of a run that has no checkpoint yet starts again from step 0), or None."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run directory")
    if not resume:
        if holds_run(out):
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose a new --out")
        return None
    if not holds_run(out) and not (out / "run.json").exists():
        what = "does not exist" if not out.exists() else "holds no run (no checkpoints, logs or run.json)"
        raise ValueError(f"--resume: {out} {what}; drop --resume to start a new run there")
    if not list_checkpoints(out):
        return f"{out} has no checkpoint yet: starting the run again from step 0"
    return None
