"""Checkpoints of a run: ``RUN/checkpoints/step-{N:06d}/``.

Each holds what a user loads (a PEFT adapter via ``save_pretrained``, or for full fine-tuning the whole
model in HF format, plus the tokenizer), ``prefcache.json`` (step, base model, settings, for humans and
``prefcache score``) and ``trainer_state.pt`` (optimizer, scheduler, RNG states of every rank, step,
epoch, the bco_pair running reward mean): everything ``--resume`` needs to reach the same weights as a
run that was never stopped. A checkpoint is written under a ``.tmp-`` name and renamed when complete, so
a killed run never leaves a half checkpoint behind.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from prefcache.core.atomic import make_temp_dir, publish_dir
from prefcache.training.rundir import (  # noqa: F401
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    write_checkpoint_info,
)


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, tokenizer, trainer_state: dict, info: dict) -> Path:
    """Write ``step-{step:06d}`` atomically; replaces an existing checkpoint of the same step."""
    import torch

    final = checkpoint_dir(run_dir, step)
    tmp = make_temp_dir(final)  # 0777 & ~umask, as mkdir: colleagues can read a shared run
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_checkpoint_info(tmp, info)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only whole checkpoints remain
        raise
    return publish_dir(tmp, final)


def load_trainer_state(path: str | os.PathLike) -> dict:
    import torch

    # Our own file (optimizer/scheduler/RNG state holds Python objects), so the full unpickler.
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)


def clean_temporaries(run_dir: str | os.PathLike) -> None:
    """Remove half-written checkpoints left by a killed run."""
    root = Path(run_dir) / "checkpoints"
    if root.exists():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".old-*"):
            shutil.rmtree(p, ignore_errors=True)
