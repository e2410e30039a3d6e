"""One writer per directory, checked with real processes: precompute and train refuse a busy directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import preference_rows, write_jsonl

from prefcache.cache.store import existing_ids, read_cache, verify
from prefcache.core.locking import LockedError, directory_lock, lock_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
       "PREFCACHE_ALLOCATOR": "system"}
HOLD = """
import sys, time
from prefcache.core.locking import directory_lock
with directory_lock(sys.argv[1], "holder"):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_in_child(directory: Path) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_held_lock_is_refused_naming_the_holder_and_a_dead_holder_never_blocks(tmp_path):
    child = hold_in_child(tmp_path / "d")
    try:
        with pytest.raises(LockedError, match=rf"being written by holder \(pid {child.pid} on "):
            with directory_lock(tmp_path / "d", "second"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert lock_path(tmp_path / "d").exists()  # left by the killed holder: recognised as not held
    with directory_lock(tmp_path / "d", "third"):
        assert "third" in lock_path(tmp_path / "d").read_text()
    assert not lock_path(tmp_path / "d").exists()


def test_a_lock_that_created_its_directory_removes_it_when_nothing_was_written(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with directory_lock(tmp_path / "new", "x"):
            raise ValueError("boom")
    assert not (tmp_path / "new").exists()


def test_ranks_take_their_own_locks(tmp_path):
    with directory_lock(tmp_path, "rank 0"), directory_lock(tmp_path, "rank 1", rank=1):
        assert lock_path(tmp_path).exists() and lock_path(tmp_path, 1).exists()


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "prefcache", *args]


def test_precompute_refuses_a_cache_another_process_is_writing(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    child = hold_in_child(tmp_path / "cache")
    try:
        r = subprocess.run(cli("precompute", "--data", str(data), "--out", str(tmp_path / "cache"), "--model",
                               str(tiny_model), "--max-length", "64", "--no-progress"),
                           capture_output=True, text=True, env=ENV)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert r.returncode == 1 and f"pid {child.pid}" in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "cache").glob("part-r*"))


def test_two_concurrent_precompute_processes_lose_no_rows(tmp_path, tiny_model):
    """16 + 16 pairs, 12 shared, started together on one --out: the refused one (if they overlapped)
    reruns; the cache ends with the 20 distinct ids once each, every shard whole."""
    rows = preference_rows(20)
    a = write_jsonl(tmp_path / "a.jsonl", rows[:16])
    b = write_jsonl(tmp_path / "b.jsonl", rows[4:])
    out = tmp_path / "cache"

    def start(data):
        return subprocess.Popen(cli("precompute", "--data", str(data), "--out", str(out), "--model", str(tiny_model),
                                    "--max-length", "64", "--shard-size", "2", "--no-progress"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)

    procs = {a: start(a), b: start(b)}
    results = {data: (p.wait(), p.stderr.read()) for data, p in procs.items()}
    for data, (code, err) in results.items():
        if code != 0:
            assert "being written by prefcache precompute" in err and "Traceback" not in err, err
            retry = subprocess.run(cli("precompute", "--data", str(data), "--out", str(out), "--model",
                                       str(tiny_model), "--max-length", "64", "--no-progress"),
                                   capture_output=True, text=True, env=ENV)
            assert retry.returncode == 0, retry.stderr
    ids = read_cache(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 20
    assert verify(out) == [] and existing_ids(out) == set(ids)
    assert not list(out.glob(".tmp-*")) and not lock_path(out).exists()


def test_train_refuses_a_run_another_process_is_writing(tmp_path, tiny_model):
    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8))
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=64, progress=False)
    child = hold_in_child(tmp_path / "run")
    try:
        started = time.perf_counter()
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            train(data=str(data), cache=str(tmp_path / "cache"), model=str(tiny_model), out=str(tmp_path / "run"),
                  max_steps=1, progress=False)
        assert time.perf_counter() - started < 30  # refused at once, not after training
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".prefcache-lock"]
