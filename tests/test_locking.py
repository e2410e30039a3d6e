"""One writer per directory, checked with real processes: precompute and train refuse a busy directory,
and a refused writer always names the holder (its details are visible no later than its lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ENV as CHILD_ENV
from conftest import finish, preference_rows, read_line, write_jsonl

from prefcache.cache.store import existing_ids, read_cache, verify
from prefcache.core.locking import PAUSE_ENV, LockedError, directory_lock, lock_path

ENV = {**CHILD_ENV, "PREFCACHE_ALLOCATOR": "system"}
TIMEOUT = 300  # seconds for any one child: far above its work (a few seconds), so only a hang reaches it
HOLD = """
import sys, time
from prefcache.core.locking import directory_lock
with directory_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def wait_for(path: Path, child: subprocess.Popen) -> None:
    """Until ``path`` exists; fails at once if ``child`` exits first, or after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not path.exists():
        if child.poll() is not None:
            _, err = finish(child, TIMEOUT)
            pytest.fail(f"the child exited ({child.returncode}) before {path.name} appeared:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            stop(child)
            pytest.fail(f"{path.name} did not appear within {TIMEOUT} s")
        time.sleep(0.02)


def stop(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    finish(child, TIMEOUT)


def hold_in_child(directory: Path, tmp_path: Path) -> subprocess.Popen:
    """A process holding the lock of ``directory`` until killed; returns once it holds it."""
    gate = tmp_path / f"gate-{directory.name}"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**ENV, PAUSE_ENV: str(gate)})
    wait_for(gate.with_name(gate.name + ".taken"), child)
    gate.touch()  # let it go on to print and sleep
    assert read_line(child, TIMEOUT).strip() == "held"
    return child


def test_a_held_lock_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    child = hold_in_child(tmp_path / "d", tmp_path)
    try:
        with pytest.raises(LockedError, match=rf"being written by holder \(pid {child.pid} on "):
            with directory_lock(tmp_path / "d", "second"):
                pass
    finally:
        stop(child)
    assert lock_path(tmp_path / "d").exists()  # left by the killed holder: recognised as not held
    with directory_lock(tmp_path / "d", "third"):
        assert "third" in lock_path(tmp_path / "d").read_text()
        assert [p.name for p in (tmp_path / "d").iterdir()] == [".prefcache-lock"]
    assert not lock_path(tmp_path / "d").exists()


def test_a_writer_refused_at_the_instant_the_lock_is_taken_names_the_holder(tmp_path):
    """The holder stops at the very moment its lock is taken (the test hook): a second writer refused
    then reads the holder's whole details. (Before, they were written after the flock, and a writer
    refused in between said "another process".)"""
    gate = tmp_path / "gate"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "d")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**ENV, PAUSE_ENV: str(gate)})
    try:
        wait_for(tmp_path / "gate.taken", child)
        with pytest.raises(LockedError, match=rf"being written by holder \(pid {child.pid} on .*, since "):
            with directory_lock(tmp_path / "d", "second"):
                pass
    finally:
        stop(child)


def test_temporaries_of_killed_acquirers_are_removed_and_live_ones_kept(tmp_path):
    import fcntl

    dead = tmp_path / ".prefcache-lock.tmp-1-dead"  # an acquirer killed before it linked its details
    dead.write_text("{}")
    live = tmp_path / ".prefcache-lock.tmp-2-live"  # one still working: it holds its temporary's lock
    live.write_text("{}")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with directory_lock(tmp_path, "x"):
            assert sorted(p.name for p in tmp_path.iterdir()) == [".prefcache-lock", live.name]
    finally:
        os.close(fd)


def test_without_hard_links_the_lock_file_is_locked_in_place(tmp_path, monkeypatch):
    import errno

    def no_links(src, dst, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")  # what FAT or some FUSE mounts answer

    monkeypatch.setattr(os, "link", no_links)
    with directory_lock(tmp_path, "first"):
        assert [p.name for p in tmp_path.iterdir()] == [".prefcache-lock"]
        with pytest.raises(LockedError, match=rf"being written by first \(pid {os.getpid()} on "):
            with directory_lock(tmp_path, "second"):
                pass
    assert list(tmp_path.iterdir()) == []


def test_a_lock_that_created_its_directory_removes_it_when_nothing_was_written(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with directory_lock(tmp_path / "new", "x"):
            raise ValueError("boom")
    assert not (tmp_path / "new").exists()


def test_ranks_take_their_own_locks(tmp_path):
    with directory_lock(tmp_path, "rank 0"), directory_lock(tmp_path, "rank 1", rank=1):
        assert lock_path(tmp_path).exists() and lock_path(tmp_path, 1).exists()
        with pytest.raises(LockedError, match="being written by rank 1 "):
            with directory_lock(tmp_path, "again", rank=1):
                pass


CONTEND = """
import os, sys, time
from prefcache.core.locking import LockedError, directory_lock
directory, inside, taken, named = sys.argv[1], os.path.join(sys.argv[1], "inside"), 0, 0
print("ready", flush=True)
while not os.path.exists(sys.argv[3]):  # all start together
    time.sleep(0.001)
attempts = 0
# At least N tries, and on until this one has held it once: a loaded machine may starve one contender for a while.
while attempts < int(sys.argv[2]) or (taken == 0 and attempts < 100 * int(sys.argv[2])):
    attempts += 1
    try:
        with directory_lock(directory, f"contender {os.getpid()}"):
            os.close(os.open(inside, os.O_CREAT | os.O_EXCL))  # FileExistsError: two holders at once
            os.unlink(inside)
            taken += 1
    except LockedError as e:
        assert "being written by contender " in str(e), str(e)
        named += 1
print(taken, named, attempts)
"""


def test_contending_writers_exclude_each_other_and_every_refusal_names_the_holder(tmp_path):
    """Four processes take and release one lock 300 times each: never two holders at once, and every
    refusal names its holder, whichever step of taking or releasing the holder was at."""
    go = tmp_path.parent / f"{tmp_path.name}-go"
    procs = [subprocess.Popen([sys.executable, "-c", CONTEND, str(tmp_path), "300", str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(4)]
    assert [read_line(p, TIMEOUT).strip() for p in procs] == ["ready"] * 4
    go.touch()
    counts = []
    for p in procs:
        out, err = finish(p, TIMEOUT)
        assert p.returncode == 0, err[-3000:]
        counts.append([int(n) for n in out.split()])
    assert all(taken > 0 and taken + named == attempts >= 300 for taken, named, attempts in counts)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock file and no temporary left


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "prefcache", *args]


def test_precompute_refuses_a_cache_another_process_is_writing(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    child = hold_in_child(tmp_path / "cache", tmp_path)
    try:
        r = subprocess.run(cli("precompute", "--data", str(data), "--out", str(tmp_path / "cache"), "--model",
                               str(tiny_model), "--max-length", "64", "--no-progress"),
                           capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    finally:
        stop(child)
    assert r.returncode == 1 and f"pid {child.pid}" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "cache").glob("part-r*"))


def test_two_concurrent_precompute_processes_lose_no_rows(tmp_path, tiny_model):
    """16 + 16 pairs, 12 shared, on one --out. The first pass stops at the instant it takes the lock
    (the test hook); the second, started then, is refused naming it, and reruns once the first is done.
    The cache ends with the 20 distinct ids once each, every shard whole."""
    rows = preference_rows(20)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:16])
    b = write_jsonl(tmp_path / "b.jsonl", rows[4:])
    out = tmp_path / "cache"
    gate = tmp_path / "gate"

    def command(data):
        return cli("precompute", "--data", str(data), "--out", str(out), "--model", str(tiny_model),
                   "--max-length", "64", "--shard-size", "2", "--no-progress")

    first = subprocess.Popen(command(a), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**ENV, PAUSE_ENV: str(gate)})
    try:
        wait_for(tmp_path / "gate.taken", first)
        second = subprocess.run(command(b), capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    finally:
        gate.touch()
        _, err = finish(first, TIMEOUT)
    assert first.returncode == 0, err
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"being written by prefcache precompute (pid {first.pid} on " in second.stderr, second.stderr
    assert len(set(read_cache(out, columns=["id"]).column("id").to_pylist())) == 16  # the second wrote nothing
    retry = subprocess.run(command(b), capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert retry.returncode == 0, retry.stderr
    ids = read_cache(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20
    assert verify(out) == [] and existing_ids(out) == set(ids)
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".prefcache-lock*"))


def test_train_refuses_a_run_another_process_is_writing(tmp_path, tiny_model, monkeypatch):
    import prefcache.training.loop as loop
    from prefcache.reference.shards import precompute

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=64, progress=False)
    entered = []  # refused at once: the training itself (data, model, steps) is never entered

    def spy(name):
        real = getattr(loop, name)
        return lambda *args: entered.append(name) or real(*args)

    for name in ("start", "_train"):
        monkeypatch.setattr(loop, name, spy(name))
    child = hold_in_child(tmp_path / "run", tmp_path)
    try:
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            loop.train(data=str(data), cache=str(tmp_path / "cache"), model=str(tiny_model),
                       out=str(tmp_path / "run"), max_steps=1, progress=False)
    finally:
        stop(child)
    assert entered == []
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".prefcache-lock"]
