"""The one file-writing policy of prefcache: whole files only, durable, readable as the umask allows.

Every file prefcache writes (cache shards and manifest, run logs, pairs.parquet, run.json, evals,
bad_rows.jsonl, config.yaml, reports, checkpoints, exports, de-quantised GGUF copies, the fingerprint
memo) goes through here (``tests/test_atomic.py`` checks that no other module renames or creates files):
- written under a hidden temporary name in the target folder, fsync'ed, then renamed over the final
  name, so a reader or a crash sees the whole file or none of it;
- given the mode an ordinary ``open()`` would give (0666 & ~umask, folders 0777 & ~umask): ``mkstemp``
  and ``mkdtemp`` create 0600 / 0700, which made shared runs unreadable by colleagues;
- a write that fails (disk full, file-size limit, read-only folder) removes its temporary file and
  raises :class:`WriteError`, one line naming the file and how much of it was written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

# The temp suffix is no reader's suffix: no *.parquet / *.json glob ever picks up a half-written file.
TMP_PREFIX = ".tmp-"
TMP_SUFFIX = ".part"


class WriteError(OSError):
    """A file could not be written whole; only whole files were left behind."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return self.strerror or super().__str__()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], *, prefix: str = TMP_PREFIX) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file, then move it to ``path`` atomically."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as e:
        raise WriteError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        written = _size(tmp)
        _remove(tmp)
        if isinstance(e, OSError):
            raise WriteError(e.errno, f"cannot write {path}: {_reason(e)} ({written:,} bytes written, "
                                      "removed; whole files only are kept)") from e
        raise
    _fsync_dir(path.parent)
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, prefix: str = TMP_PREFIX) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write, prefix=prefix)


def write_json_atomic(obj, path: str | os.PathLike) -> Path:
    """``obj`` as indented JSON with sorted keys (values JSON cannot hold written as ``str``)."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_table_atomic(table, path: str | os.PathLike, *, prefix: str = TMP_PREFIX) -> Path:
    """An Arrow table as a zstd-compressed Parquet file. The temporary name ends in ``.part``: no
    ``*.parquet`` glob (the SQL views, a reader of the cache) ever picks up a half-written file."""
    import pyarrow.parquet as pq

    return write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"), prefix=prefix)


def make_temp_dir(final: Path) -> Path:
    """A temporary sibling folder of ``final`` to fill, then :func:`publish_dir`; mode as ``mkdir`` gives."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{TMP_PREFIX}{final.name}-"))
    os.chmod(tmp, dir_mode())
    return tmp


def publish_dir(tmp: Path, final: Path, *, keep_existing: bool = False) -> Path:
    """Move a filled temporary folder to ``final`` (replacing an existing one) after syncing its files.
    ``keep_existing``: a ``final`` that exists by now (another process made the same folder) is kept, and
    ``tmp`` removed."""
    if keep_existing and final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return final
    for p in tmp.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(p, file_mode())  # safetensors writes its files 0600 whatever the umask
        elif p.is_dir():
            os.chmod(p, dir_mode())
    if final.exists():  # a rerun of the same step: move the old one aside, then swap
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def _reason(e: OSError) -> str:
    names = {28: "no space left on device", 27: "file too large (file-size limit)", 30: "read-only file system",
             13: "permission denied", 122: "disk quota exceeded"}
    return names.get(e.errno, e.strerror or str(e))


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a crash right after it must not bring back the old name)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
