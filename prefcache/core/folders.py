"""What a prefcache output folder is: a reference cache, a training run or a model folder.

Each command writes one kind of folder, and writing into another kind destroys it: ``train --out CACHE`` once
wrote a run into a cache and overwrote its config.yaml. So every command that writes a folder first asks what
the folder already is, and refuses another command's folder before anything is written. The kinds are told
apart by the files their writers leave first, declared here once (the cache and run modules use these names):

- a reference cache: ``manifest.json`` (the mirror of its metadata, written before the first shard) or a shard;
- a training run: ``run.json`` or a ``checkpoints/`` folder;
- a model folder (``prefcache export``'s, or a checkpoint): ``config.json`` or ``adapter_config.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_MANIFEST = "manifest.json"
SHARD_GLOB = "part-r*.parquet"
RUN_JSON = "run.json"
CHECKPOINTS = "checkpoints"
MODEL_FILES = ("config.json", "adapter_config.json")

KINDS = {"cache": "a reference cache", "run": "a training run", "model": "a model folder"}


class FolderKindError(ValueError):
    """A command was pointed at a folder another command wrote; the message says what it is and what to do."""


def folder_kind(path: str | os.PathLike) -> tuple[str, str] | None:
    """(``cache`` | ``run`` | ``model``, the file that says so) for a prefcache output folder, else None."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if (path / CACHE_MANIFEST).is_file():
        return "cache", CACHE_MANIFEST
    if shard := next(iter(sorted(path.glob(SHARD_GLOB))), None):
        return "cache", shard.name
    if (path / RUN_JSON).is_file():
        return "run", RUN_JSON
    if (path / CHECKPOINTS).is_dir():
        return "run", f"{CHECKPOINTS}/"
    if name := next((n for n in MODEL_FILES if (path / n).is_file()), None):
        return "model", name
    return None


def check_folder_kind(path: str | os.PathLike, wants: str, hint: str, option: str = "--out",
                      also: tuple[str, ...] = ()) -> None:
    """Refuse ``path`` when it is a folder of another kind than ``wants`` (or ``also``), in one line ending with
    ``hint``."""
    found = folder_kind(path)
    if found and found[0] != wants and found[0] not in also:
        kind, evidence = found
        raise FolderKindError(f"{option} {path} is {KINDS[kind]} (it has {evidence}), not {KINDS[wants]}; "
                              f"it is left as it is: {hint}")
