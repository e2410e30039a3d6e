"""One writer per directory: an exclusive lock held for a whole precompute pass, training run or scoring.

Two ``prefcache precompute`` on one cache used to score the same pairs twice and overwrite each other's
shards. The lock is ``fcntl.flock`` on ``DIR/.prefcache-lock`` (well-kept, in the standard library, and
released by the kernel when its process dies, so a lock left by a killed process is never "stale": the
file may remain, but nobody holds it). The file says who holds it (command, pid, host, since), so a
refused writer can name the holder. On release the file is removed; an acquirer checks that the file
it locked is still the one at the path, so a lock on a just-removed file never counts.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".prefcache-lock"


class LockedError(BlockingIOError):
    """The directory is being written by another process (an OSError: the CLI shows it as one line)."""


def lock_path(directory: str | os.PathLike, rank: int = 0) -> Path:
    """Ranks of one data-parallel job each write their own shards, so each takes its own lock."""
    return Path(directory) / (LOCK_NAME if rank == 0 else f"{LOCK_NAME}-r{rank:03d}")


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words (what the lock file says)."""
    try:
        info = json.loads(path.read_text())
        return f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError):
        return "another process"


@contextmanager
def directory_lock(directory: str | os.PathLike, command: str, *, rank: int = 0, enabled: bool = True):
    """Hold the exclusive lock of ``directory`` (created if missing) for the ``with`` block, or raise
    :class:`LockedError` naming the holder. ``enabled=False`` (ranks that write nothing) does nothing."""
    if not enabled:
        yield
        return
    directory = Path(directory)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create {directory}: {e.strerror}") from e
    path = lock_path(directory, rank)
    fd = _acquire(path, command)
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # while still holding it: the next acquirer re-checks the inode
        except OSError:
            pass
        os.close(fd)  # releases the flock
        if created:
            try:
                directory.rmdir()  # only if the command left it empty (it failed before writing)
            except OSError:
                pass


def _acquire(path: Path, command: str) -> int:
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise OSError(e.errno, f"cannot write to {path.parent}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise LockedError(f"{path.parent} is being written by {holder(path)}; wait for it to finish "
                              "(a second writer would lose or duplicate work)") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its holder had just removed: try again on the current one
    info = {"command": command, "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd
