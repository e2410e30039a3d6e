"""One writer per directory: an exclusive lock held for a whole precompute pass, training run or scoring.

Two ``prefcache precompute`` on one cache used to score the same pairs twice and overwrite each other's
shards. The lock is ``fcntl.flock`` on ``DIR/.prefcache-lock`` (well-kept, in the standard library, and
released by the kernel when its process dies, so a lock left by a killed process is never "stale": the
file may remain, but nobody holds it).

The file says who holds it (command, pid, host, since), and it says so from the instant it exists: the
details are written to a private temporary file, which is locked and then linked into place (or renamed
over a file nobody holds). A refused writer therefore always reads a whole file and names the holder.
The file at the path changes only by ``link`` when nothing is there, or at the hands of whoever holds
the lock on the file that is there (rename over a dead holder's file; unlink on release), so an acquirer
that locked a file no longer at the path just tries again. Where the file system has no hard links, the
file at the path is locked, then written (a writer refused in between says "another process").
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

LOCK_NAME = ".prefcache-lock"
# Test hook: a path. At the instant the lock is taken (the moment a second writer is refused), the holder
# creates PATH.taken and waits, up to a minute, for PATH to exist: a test can act inside that window.
PAUSE_ENV = "PREFCACHE_TEST_LOCK_PAUSE"


class LockedError(BlockingIOError):
    """The directory is being written by another process (an OSError: the CLI shows it as one line)."""


def lock_path(directory: str | os.PathLike, rank: int = 0) -> Path:
    """Ranks of one data-parallel job each write their own shards, so each takes its own lock."""
    return Path(directory) / (LOCK_NAME if rank == 0 else f"{LOCK_NAME}-r{rank:03d}")


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, in words (what the lock file says)."""
    try:
        return _describe(path.read_bytes())
    except OSError:
        return "another process"


def _refusal(path: Path, who: str) -> LockedError:
    return LockedError(f"{path.parent} is being written by {who}; wait for it to finish "
                       "(a second writer would lose or duplicate work)")


def _describe(details: bytes) -> str:
    try:
        info = json.loads(details)
        return f"{info['command']} (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process"  # the empty file of a prefcache that wrote its details after locking


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
    """The descriptor of the lock file now at ``path``, locked, holding this process's details."""
    while True:
        fd, tmp = _details_file(path, command)
        try:
            outcome = _place(tmp, path)
            if outcome == "taken":
                _unlink(tmp)  # the second name of the linked file (a renamed one has none)
                _remove_dead_temporaries(path)
                _pause_for_tests()
                return fd
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        os.close(fd)
        _unlink(tmp)
        if outcome == "no hard links":
            return _acquire_in_place(path, command)


def _place(tmp: Path, path: Path) -> str:
    """Put our locked details file ``tmp`` at ``path``: "taken", "again" (something moved: retry), or
    "no hard links" (a file system without them), or raise :class:`LockedError`."""
    try:
        os.link(tmp, path)  # nothing there: ours appears whole and already locked
        return "taken"
    except FileExistsError:
        try:
            return "taken" if _replace_if_unheld(path, tmp) else "again"
        except FileNotFoundError:
            return "again"  # the lock file left as we looked
    except FileNotFoundError:
        return "again"  # our temporary was swept as dead (created, not yet locked): a new one
    except OSError as e:
        if e.errno in _NO_HARD_LINKS:
            return "no hard links"
        raise


def _details(command: str) -> bytes:
    return json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                       "since": datetime.now(timezone.utc).isoformat(timespec="seconds"), "argv": sys.argv}).encode()


def _details_file(path: Path, command: str) -> tuple[int, Path]:
    """A new file next to ``path``, locked by us, holding who we are."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise OSError(e.errno, f"cannot write to {path.parent}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # at once, or after a sweeper that took it for dead: see _acquire
        os.write(fd, _details(command))
    except OSError:
        os.close(fd)
        _unlink(tmp)
        raise
    return fd, tmp


def _replace_if_unheld(path: Path, tmp: Path) -> bool:
    """A lock file is at ``path``. Its holder alive: refused, naming it. Dead (or just released): ours
    replaces it, renamed over it while we hold its lock, so nobody else can change the path meanwhile."""
    theirs = os.open(path, os.O_RDONLY)  # FileNotFoundError: released as we looked, try again
    try:
        try:
            fcntl.flock(theirs, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            # Read through our descriptor: the holder's file even if it is released meanwhile.
            who = _describe(os.pread(theirs, 1 << 16, 0))
            raise _refusal(path, who) from None
        if os.fstat(theirs).st_ino != os.stat(path).st_ino:
            return False  # released and taken again while we opened it
        os.rename(tmp, path)
        return True
    finally:
        os.close(theirs)


# What link(2) fails with where the file system has no hard links (FAT, some network and FUSE mounts).
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _acquire_in_place(path: Path, command: str) -> int:
    """Without hard links: lock the file at ``path`` itself, then write the details into it. A writer
    refused between the two says "another process"; nothing is lost, only the holder's name."""
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
            raise _refusal(path, holder(path)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # we locked a file its holder had just removed: try again on the current one
    os.ftruncate(fd, 0)
    os.write(fd, _details(command))
    _pause_for_tests()
    return fd


def _remove_dead_temporaries(path: Path) -> None:
    """Remove the temporaries of acquirers killed before they linked or removed theirs: those nobody holds.
    (One created but not yet locked may be swept too; its owner then finds it gone and tries again.)"""
    for stale in path.parent.glob(f"{path.name}.tmp-*"):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)


def _pause_for_tests() -> None:
    if gate := os.environ.get(PAUSE_ENV):
        Path(gate + ".taken").touch()
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
