"""Checkpoints of a run, in one module (as nanochat's ``checkpoint_manager``): where they live, what each
holds, saving, finding the latest, loading, and whether a resume may continue from one.

``RUN/checkpoints/step-{N:06d}/`` holds what a user loads (a PEFT adapter via ``save_pretrained``, or for full
fine-tuning the whole model in HF format, plus the tokenizer), ``prefcache.json`` (step, base model, settings,
for humans and ``prefcache score``/``export``) and ``trainer_state.pt`` (optimizer, scheduler, RNG states of every
rank, step, epoch, the bco_pair running reward mean, the data-order settings): everything ``--resume`` needs
to reach the same weights as a run that was never stopped (a ``--fsdp`` run keeps its model and optimizer state
in ``sharded/``, PyTorch's distributed checkpoint, instead of the optimizer in ``trainer_state.pt``). A checkpoint is written under a ``.tmp-`` name and
renamed when complete, so a killed run never leaves a half checkpoint behind; a folder without
``trainer_state.pt`` is not a checkpoint. Listing needs no torch (``prefcache eval`` and the CLI's refusals
use it); saving and loading import it when called.

Run knowledge lives in three modules: this one (a checkpoint), :mod:`prefcache.training.rundir` (the run
directory: run.json, fresh or resume, checkpoint arguments) and :mod:`prefcache.training.log` (its Parquet logs).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

from prefcache import __version__
from prefcache.core.atomic import make_temp_dir, publish_dir, write_json_atomic
from prefcache.core.distributed import barrier, gather
from prefcache.training.config import loss_settings

CHECKPOINT_JSON = "prefcache.json"  # in each checkpoint: step, base model, settings (for humans and score)
# 1: the pair and unpaired loops of before; 2: the one loop (an unpaired run's batches length-grouped)
STATE_VERSION = 2
_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, (step, path), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))
             and (p / "trainer_state.pt").exists()]
    return sorted(found)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_checkpoint_info(checkpoint: str | os.PathLike, info: dict) -> Path:
    return write_json_atomic(info, Path(checkpoint) / CHECKPOINT_JSON)


def read_checkpoint_info(checkpoint: str | os.PathLike) -> dict | None:
    """A checkpoint's prefcache.json, or None (not a prefcache checkpoint)."""
    path = Path(checkpoint) / CHECKPOINT_JSON
    return json.loads(path.read_text()) if path.exists() else None


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


def save_checkpoint(run_dir: str | os.PathLike, step: int, model, tokenizer, trainer_state: dict, info: dict, *,
                    tmp: Path | None = None, state_dict: dict | None = None) -> Path:
    """Write ``step-{step:06d}`` atomically; replaces an existing checkpoint of the same step. ``tmp``: its
    temporary folder, made already (the ranks of a --fsdp run wrote their shards there); ``state_dict``: the
    model's weights, gathered from its shards (None: the model's own)."""
    import torch

    final = checkpoint_dir(run_dir, step)
    tmp = tmp or make_temp_dir(final)  # 0777 & ~umask, as mkdir: colleagues can read a shared run
    try:
        model.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        tokenizer.save_pretrained(tmp)
        write_checkpoint_info(tmp, info)
        torch.save(trainer_state, tmp / "trainer_state.pt")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only whole checkpoints remain
        raise
    return publish_dir(tmp, final)


def save(run, at_step: int) -> None:
    """Checkpoint a :class:`~prefcache.training.state.RunState` at ``at_step``: the policy and tokenizer, what
    ``--resume`` needs, and every rank's RNGs (gathered: every rank calls this). A --fsdp run's model and
    optimizer state go to ``sharded/`` (:mod:`prefcache.training.sharded`), each rank writing its shard."""
    rngs = gather(rng_state(), run.world)
    sharded = run.cfg.fsdp
    tmp = full = None
    if sharded:
        from prefcache.training.sharded import SHARDED_DIR, full_policy_state, save_sharded

        made = str(make_temp_dir(checkpoint_dir(run.out, at_step))) if run.main else None
        tmp = Path(gather(made, run.world)[0])
        save_sharded(tmp / SHARDED_DIR, run.module, run.optimizer)
        full = full_policy_state(run.module, run.world)
    if run.main:
        run.log.flush()  # the logs up to this step are on disk before the checkpoint that vouches for them
        cfg = run.cfg
        trainer_state = {"version": STATE_VERSION, "step": at_step, "epoch": run.epoch(at_step),
                         "scheduler": run.scheduler.state_dict(), "sharded": sharded,
                         **({} if sharded else {"optimizer": run.optimizer.state_dict()}),
                         "rng": rngs, "bco": run.bco.state_dict(), "elapsed_s": run.elapsed(),
                         "world_size": run.world, "n_train": run.n_train, "batch_size": cfg.batch_size,
                         "grad_accum": cfg.grad_accum, "seed": cfg.seed, "last_eval_step": run.last_eval_step,
                         "group_by_length": run.group_by_length, "fingerprints": run.fingerprints}
        info = {"step": at_step, "epoch": run.epoch(at_step), "base_model": run.policy_info["model_name"],
                "model": cfg.model, "finetune": cfg.finetune, "max_length": run.max_length,
                "truncation": run.truncation, "loss": list(cfg.loss), "beta": cfg.beta, "cache": cfg.cache,
                "loss_settings": loss_settings(cfg), "prefcache_version": __version__}
        save_checkpoint(run.out, at_step, run.policy, run.tokenizer, trainer_state, info, tmp=tmp, state_dict=full)
    barrier(run.world)
    run.last_saved = at_step


def load_trainer_state(path: str | os.PathLike) -> dict:
    import torch

    # Our own file (optimizer/scheduler/RNG state holds Python objects), so the full unpickler.
    return torch.load(Path(path) / "trainer_state.pt", map_location="cpu", weights_only=False)


def resumed_grouping(state: dict | None, group_by_length: bool, unpaired: bool) -> bool:
    """Whether a run's batches are length-grouped: as asked, except that an unpaired run checkpointed by the
    loop of before (state version 1, random batches) continues with the order it began with."""
    if state and unpaired and state.get("version", 1) < 2:
        return bool(state.get("group_by_length", False))
    return group_by_length


# What each fingerprint (``state.fingerprints``) stands for, in a refusal.
FINGERPRINTS = {"data": "the training examples, in order", "eval_data": "the held-out examples",
                "cache": "what made its values: model, tokenisation, precision",
                "eval_cache": "what made its values: model, tokenisation, precision"}


def check_resumable(state: dict, *, world: int, n_train: int, cfg, group_by_length: bool | None = None,
                    fingerprints: dict | None = None) -> None:
    """The data order is a function of these, and the examples and reference values of the run: resuming
    with others would not continue the same run. ``fingerprints`` (:func:`prefcache.training.state.fingerprints`)
    are compared where the checkpoint recorded them (older ones did not: nothing to compare)."""
    now = {"world_size": world, "n_train": n_train, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
           "seed": cfg.seed,
           "group_by_length": cfg.group_by_length if group_by_length is None else group_by_length}
    had = {"group_by_length": False}  # checkpoints from before length grouping: random batches
    if same_steps_on_other_ranks(state, now):
        now = {k: v for k, v in now.items() if k not in ("world_size", "batch_size", "grad_accum")}
    diff = [f"{k}: checkpoint has {state.get(k, had.get(k))!r}, now {v!r}" for k, v in now.items()
            if state.get(k, had.get(k)) != v]
    if getattr(cfg, "fsdp", False) and world > 1 and not state.get("sharded"):
        diff.append("fsdp: the checkpoint has no sharded state (saved without --fsdp), now sharded")
    recorded = state.get("fingerprints") or {}
    diff += [f"{k} ({FINGERPRINTS[k]}): checkpoint has {recorded[k]!r}, now {v!r}"
             for k, v in (fingerprints or {}).items() if k in recorded and recorded[k] != v]
    if diff:
        raise ValueError("cannot resume with other settings:\n  " + "\n  ".join(diff))


def same_steps_on_other_ranks(state: dict, now: dict) -> bool:
    """Whether a resume on another number of ranks takes the same steps: as many pairs per step (batch size x
    grad_accum x ranks) and no padding of the order at either rank count, so each step sees the same pairs
    (:func:`~prefcache.training.state.epoch_order`); only the split of a step's sum differs (fp32 reorder noise)."""
    was, world = state.get("world_size", 1), now["world_size"]
    per_step = lambda w, b, a: w * b * a  # noqa: E731
    return (was != world and state["n_train"] % was == 0 and state["n_train"] % world == 0
            and per_step(was, state.get("batch_size"), state.get("grad_accum"))
            == per_step(world, now["batch_size"], now["grad_accum"]))


def check_same_objective(run_dir: str | os.PathLike, settings: dict) -> None:
    """A resume continues the run's objective: refuse another loss, β or loss option, each difference on a line.

    ``settings``: :func:`prefcache.training.config.loss_settings` of the resume. The latest checkpoint's
    prefcache.json says what the run trained with (checkpoints before ``loss_settings``: the loss and β). No
    torch and no data: it is checked before anything is read or written.
    """
    ckpt = latest_checkpoint(run_dir)
    info = (read_checkpoint_info(ckpt) if ckpt else None) or {}
    had = info.get("loss_settings") or {k: info[k] for k in ("loss", "beta") if k in info}
    if diff := [f"{k}: checkpoint has {had[k]!r}, now {settings[k]!r}" for k in had
                if k in settings and had[k] != settings[k]]:
        raise ValueError(f"cannot resume with another loss ({ckpt.name} trained with the one below; a run keeps "
                         "its objective: start a new --out to change it):\n  " + "\n  ".join(diff))


def clean_temporaries(run_dir: str | os.PathLike) -> None:
    """Remove half-written checkpoints left by a killed run."""
    root = Path(run_dir) / "checkpoints"
    if root.exists():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(".old-*"):
            shutil.rmtree(p, ignore_errors=True)
