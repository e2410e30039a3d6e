"""Hugging Face Hub ids for models and adapters: resolved to a snapshot folder of the Hub cache.

``huggingface_hub.snapshot_download`` does the resolving, so ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE``, ``HF_TOKEN`` (or ``hf auth login``) and ``HF_ENDPOINT`` behave as they do for
``from_pretrained``: online, a revision is checked and missing files are fetched; offline (or with the Hub
unreachable) the cached snapshot is used. transformers and peft then load that folder with their own
``from_pretrained``. An id is never refused for being offline; only for being neither cached nor fetchable.

The snapshot folder's name is the resolved commit, so a cache records ``model_id`` + ``model_revision``
and fingerprints the files themselves: another revision is another model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a causal LM or a PEFT adapter needs; not ONNX/TF/Flax exports or "original/" checkpoints.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "tokenizer*"]
_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message says why in one line."""


def looks_like_id(name: str) -> bool:
    """``org/name`` or ``name`` (optionally ``@revision``), as the Hub spells repository ids."""
    repo, _, _ = str(name).partition("@")
    return bool(_ID.match(repo)) and not repo.endswith((".gguf", ".json", ".jsonl", ".parquet", ".csv"))


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); an explicit ``revision`` wins."""
    repo, at, rev = str(name).partition("@")
    return repo, revision or (rev if at else None)


def offline() -> bool:
    """HF_HUB_OFFLINE, read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    """The Hub cache as huggingface_hub would pick it, read now: HF_HUB_CACHE, else HF_HOME/hub."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def snapshot(repo_id: str, revision: str | None = None, *, what: str = "model") -> Path:
    """The local snapshot folder of a Hub model or adapter repository (downloading it when online).

    Raises :class:`HubError` with one line: offline and not cached, unknown repository or revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    label = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                        local_files_only=offline(), allow_patterns=MODEL_FILES))
        if what == "model" and not any(folder.glob("*.safetensors")) and not offline():
            # Only pickled weights in this repository: fetch those too (transformers prefers safetensors).
            folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(),
                                            allow_patterns=[*MODEL_FILES, "*.bin"]))
    except HFValidationError as e:
        raise HubError(f"{what} not found: {repo_id} is neither a local path nor a valid Hub id") from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what} {repo_id}: revision {revision!r} does not exist on the Hub") from e
    except RepositoryNotFoundError as e:
        raise HubError(f"{what} not found: {repo_id} is not a local path, nor a Hub repository you can access "
                       "(private or gated ones need HF_TOKEN or `hf auth login`)") from e
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE is set, so it cannot be downloaded" if offline()
               else "and the Hub could not be reached to download it")
        download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
        raise HubError(f"{what} not found: {label} is not a local path and not in the Hugging Face cache "
                       f"({cache_dir()}); {why}. Download it once online (`{download}`), "
                       "or give a local folder") from e
    return folder


def resolve_adapter(adapter: str | os.PathLike | None) -> Path | None:
    """An ``--adapter`` value -> a local PEFT folder: itself, or the snapshot of a Hub id (``org/name[@rev]``)."""
    if adapter is None or str(adapter) == "":
        return None
    path = Path(adapter).expanduser()
    if path.exists() or not looks_like_id(str(adapter)):
        return path
    repo, revision = split_revision(str(adapter))
    return snapshot(repo, revision, what="adapter")
