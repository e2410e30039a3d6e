"""A run directory as a whole: ``run.json`` (the run's settings and result), whether ``--out`` may start or
resume a run there, and how a checkpoint argument (a folder, a name, a run, a Hub id, ``base``) resolves to
checkpoints. One checkpoint's folder is :mod:`prefcache.training.checkpoint`'s. Decided without loading
torch: a refusal that needs no model is instant.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from prefcache.core.atomic import write_json_atomic
from prefcache.core.folders import RUN_JSON, check_folder_kind
from prefcache.core.hub import looks_like_id, snapshot, split_revision
from prefcache.core.runconfig import read_config
from prefcache.training.checkpoint import (  # noqa: F401 - CHECKPOINT_JSON, read_checkpoint_info: export's names
    CHECKPOINT_JSON,
    list_checkpoints,
    read_checkpoint_info,
    write_checkpoint_info,
)

CONFIG_YAML = "config.yaml"  # the run's options: `train --config RUN/config.yaml` replays it, `--resume` continues it
BASE = "base"  # the checkpoint name of a run's base model


class RunDirError(ValueError):
    """A run or checkpoint that is not where, or not what, it was said to be; the message says what to do."""


def write_run_info(run_dir: str | os.PathLike, info: dict) -> Path:
    return write_json_atomic(info, Path(run_dir) / RUN_JSON)


def read_run_info(run_dir: str | os.PathLike | None) -> dict:
    """A run's run.json, or {} (no run, or none written yet)."""
    path = Path(run_dir) / RUN_JSON if run_dir else None
    return json.loads(path.read_text()) if path and path.exists() else {}


def saved_options(run_dir: str | os.PathLike) -> dict:
    """The options a run saved (RUN/config.yaml, keys as field names), or {} (none saved): what ``--resume``
    continues with wherever it is not told otherwise. An older file's one-off ``resume`` is left out."""
    path = Path(run_dir) / CONFIG_YAML
    return {k: v for k, v in read_config(path).items() if k != "resume"} if path.is_file() else {}


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
    check_folder_kind(out, "run", "choose a new --out for the run (a reference cache is given as --cache)")
    if not resume:
        if holds_run(out):
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose a new --out")
        return None
    if not holds_run(out) and not (out / RUN_JSON).exists():
        what = "does not exist" if not out.exists() else "holds no run (no checkpoints, logs or run.json)"
        raise ValueError(f"--resume: {out} {what}; drop --resume to start a new run there")
    if not list_checkpoints(out):
        return f"{out} has no checkpoint yet: starting the run again from step 0"
    return None


# ---- checkpoint arguments (prefcache eval / score)

@dataclass(frozen=True)
class Checkpoint:
    name: str  # 'base' or the folder's name, e.g. 'step-000100'
    step: int | None  # None for the base model
    path: Path | None  # None for the base model
    kind: str  # 'base' | 'adapter' (PEFT, loaded on the base) | 'full' (HF weights)


def run_settings(run: Path | None) -> dict:
    """run.json's model (None = the embedded default) and, when known, finetune, adapter (the starting one),
    beta and quantize (what the base was loaded in: 4bit for QLoRA, fp32 for full, bf16/fp32 for LoRA)."""
    data = read_run_info(run)
    if not data:
        return {}
    cfg, policy = data.get("config") or {}, data.get("policy") or {}
    get = lambda key: cfg.get(key, data.get(key))  # noqa: E731 - top level too, for hand-written files
    out = {"finetune": get("finetune"), "adapter": get("adapter"), "beta": get("beta"),
           "quantize": policy.get("quantization") or get("quantize")}
    if out["finetune"] == "qlora":
        out["quantize"] = "4bit"
    return {"model": get("model"), **{k: v for k, v in out.items() if v is not None},
            **({"revision": get("revision")} if get("revision") else {})}


def step_of(path: Path) -> int | None:
    """The step a checkpoint was saved at: from its prefcache.json, else its name (step-000100)."""
    if isinstance(step := (read_checkpoint_info(path) or {}).get("step"), int):
        return step
    m = re.fullmatch(r"(?:step|checkpoint)[-_]?(\d+)", path.name)
    return int(m.group(1)) if m else None


def checkpoint_at(path: Path) -> Checkpoint | None:
    kind = "adapter" if (path / "adapter_config.json").exists() else "full" if (path / "config.json").exists() else None
    return Checkpoint(path.name, step_of(path), path.resolve(), kind) if kind else None


def run_checkpoints(run: Path) -> list[Checkpoint]:
    """The complete checkpoints of a run (the trainer's own listing: half-written ones are left out)."""
    return [c for _, p in list_checkpoints(run) if (c := checkpoint_at(p))]


def resolve_checkpoints(names, run: str | None, base: bool, out: str | None = None) -> tuple[Path, list[Checkpoint]]:
    """Checkpoint arguments -> (run folder, checkpoints in order, ``base`` first when asked for).

    A name is ``base``, a checkpoint folder, a checkpoint's name in ``run``/checkpoints, a run folder
    (all its checkpoints), a plain model or adapter folder, or a Hub id (``org/name[@rev]``, from the Hugging
    Face cache or downloaded). The run is ``run``, else the one the checkpoint folders sit in, else ``out``.
    """
    run_dir = Path(run).expanduser().resolve() if run else None
    if run_dir and not run_dir.is_dir():
        raise RunDirError(f"run folder not found: {run}")
    found: list[Checkpoint] = []
    runs: set[Path] = set()
    for name in names:
        path = Path(name).expanduser()
        if name == BASE:
            base = True
            continue
        if not path.exists() and run_dir and (run_dir / "checkpoints" / name).is_dir():
            path = run_dir / "checkpoints" / name
        if not path.exists() and looks_like_id(name):
            repo, revision = split_revision(name)
            folder = snapshot(repo, revision, what="checkpoint")
            if not (ckpt := checkpoint_at(folder)):
                raise RunDirError(f"{name}: the Hub repository has no config.json or adapter_config.json")
            found.append(Checkpoint(name, None, folder, ckpt.kind))
            continue
        if path.is_dir() and (path / "checkpoints").is_dir() and not checkpoint_at(path):
            runs.add(path.resolve())
            if not (expanded := run_checkpoints(path)):
                raise RunDirError(f"{name} is a run folder without checkpoints (nothing in {path / 'checkpoints'})")
            found += expanded
            continue
        if not path.exists():
            where = run_dir or (path.parent.parent if path.parent.name == "checkpoints" else None)
            have = [c.name for c in run_checkpoints(where)] if where and where.is_dir() else []
            raise RunDirError(f"checkpoint not found: {name}" + (f" ({where}/checkpoints has: {', '.join(have)})" if have else "")
                            + "; give a checkpoint folder (RUN/checkpoints/step-NNNNNN), a run folder, or 'base'")
        if not (ckpt := checkpoint_at(path)):
            raise RunDirError(f"{name} is not a checkpoint: no adapter_config.json (PEFT adapter) or config.json (HF weights)")
        if path.resolve().parent.name == "checkpoints":
            runs.add(path.resolve().parent.parent)
        found.append(ckpt)
    if run_dir is None and not runs and out:
        # plain models and Hub ids: results go to OUT/evals/ (a run's or a model's folder, never a cache's)
        check_folder_kind(out, "run", "choose another --out for the results (written to OUT/evals/)", also=("model",))
        run_dir = Path(out).expanduser().resolve()
    if run_dir is None:
        if len(runs) != 1:
            raise RunDirError("checkpoints from several runs: evaluate one run at a time, or pass --run" if runs else
                            "no run folder: pass --run DIR (DIR/run.json names the base model), or --out DIR "
                            "to write the results of plain models there (DIR/evals/, created)")
        run_dir = runs.pop()
    unique = list({c.path: c for c in found}.values())
    if base:
        unique.insert(0, Checkpoint(BASE, None, None, "base"))
    return run_dir, unique
