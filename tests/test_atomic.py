"""The file-writing policy: whole files only, the umask's modes, and one clear line when a write fails."""

from __future__ import annotations

import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ENV as CHILD_ENV
from conftest import preference_rows, write_jsonl

import prefcache
from prefcache.cache.store import read_cache, shard_paths, verify
from prefcache.core.atomic import (
    WriteError,
    make_temp_dir,
    publish_dir,
    write_atomic,
    write_json_atomic,
    write_table_atomic,
    write_text_atomic,
)

ENV = {**CHILD_ENV, "PREFCACHE_ALLOCATOR": "system", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_get_the_umask_mode_and_no_temporaries_remain(tmp_path, umask022):
    write_text_atomic(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o644
    os.umask(0o077)
    write_text_atomic(tmp_path / "b.json", "{}")
    assert mode(tmp_path / "b.json") == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_a_failed_write_keeps_the_old_file_and_says_how_much_was_written(tmp_path):
    (tmp_path / "f.txt").write_text("old")

    def fail(tmp):
        Path(tmp).write_text("12345")
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write .*f\.txt: no space left on device \(5 bytes written"):
        write_atomic(tmp_path / "f.txt", fail)
    assert (tmp_path / "f.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_run_outputs_are_readable_by_others_under_umask_022(tmp_path, tiny_model, umask022):
    from prefcache.reference.shards import precompute
    from prefcache.training.loop import train

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(8) + [{"prompt": "p", "chosen": "", "rejected": "r"}])
    precompute(data=str(data), out=str(tmp_path / "cache"), model=str(tiny_model), max_length=64, progress=False,
               on_bad_row="skip")
    train(data=str(data), cache=str(tmp_path / "cache"), model=str(tiny_model), out=str(tmp_path / "run"),
          max_steps=1, progress=False, on_bad_row="skip", eval_fraction=0.25)
    run = tmp_path / "run"
    files = [run / "run.json", run / "pairs.parquet", run / "bad_rows.jsonl", *run.glob("logs/*.parquet"),
             *run.glob("checkpoints/step-000001/*"), *(tmp_path / "cache").iterdir()]
    assert len(files) > 8
    for f in files:
        assert mode(f) == 0o644, f
    for d in (run, run / "logs", run / "checkpoints", run / "checkpoints" / "step-000001"):
        assert mode(d) == 0o755, d


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_pass_that_cannot_write_a_shard_stops_with_one_line_and_a_rerun_completes(tmp_path, tiny_model):
    from prefcache.reference.shards import precompute

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(12))
    precompute(data=str(data), out=str(tmp_path / "probe"), model=str(tiny_model), max_length=64, shard_size=4,
               progress=False)
    smallest = min(p.stat().st_size for p in shard_paths(tmp_path / "probe"))
    manifest = (tmp_path / "probe" / "manifest.json").stat().st_size
    assert manifest < smallest
    cmd = [sys.executable, "-m", "prefcache", "precompute", "--data", str(data), "--out", str(tmp_path / "cache"),
           "--model", str(tiny_model), "--max-length", "64", "--shard-size", "4", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV,
                       preexec_fn=_limit_file_size((manifest + smallest) // 2), timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in r.stderr and "part-r000-000000-" in r.stderr and "bytes written" in r.stderr
    assert "rerun the same command" in r.stderr
    assert not shard_paths(tmp_path / "cache") and not list((tmp_path / "cache").glob(".tmp-*"))
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    assert verify(tmp_path / "cache") == []
    assert sorted(read_cache(tmp_path / "cache").column("id").to_pylist()) == \
        sorted(read_cache(tmp_path / "probe").column("id").to_pylist())


NOBODY = 65534


def _as_nobody():
    """In the child, before exec: become ``nobody``, keeping only the right to read and search any folder
    (CAP_DAC_READ_SEARCH, as an ambient capability): the interpreter lives under /root, mode 0700. Root
    writes into a read-only folder; ``nobody`` with that one capability cannot."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_keepcaps, pr_cap_ambient, pr_cap_ambient_raise, cap_dac_read_search = 8, 47, 2, 2

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    def check(result):
        if result != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))

    check(libc.prctl(pr_set_keepcaps, 1, 0, 0, 0))
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    bit = 1 << cap_dac_read_search
    check(libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)(Data(bit, bit, bit), Data(0, 0, 0))))
    check(libc.prctl(pr_cap_ambient, pr_cap_ambient_raise, cap_dac_read_search, 0, 0))


def test_a_read_only_cache_folder_is_one_line(tmp_path, tiny_model):
    """Run as a user the folder's mode refuses: ``nobody`` when the tests run as root (CI, this machine)."""
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(4))
    home = tmp_path / "home"  # the child's own writable home (caches of the libraries it imports)
    home.mkdir()
    (tmp_path / "ro").mkdir()
    drop = None
    if os.geteuid() == 0:
        drop = _as_nobody
        for folder in (home, tmp_path / "ro"):
            os.chown(folder, NOBODY, NOBODY)  # its owner: the mode alone refuses the write
        who = subprocess.run([sys.executable, "-c", "import os; print(os.geteuid())"], preexec_fn=drop,
                             capture_output=True, text=True, timeout=60)
        assert who.stdout.strip() == str(NOBODY), who.stderr
    os.chmod(tmp_path / "ro", 0o555)
    r = subprocess.run([sys.executable, "-m", "prefcache", "precompute", "--data", str(data), "--out",
                        str(tmp_path / "ro"), "--model", str(tiny_model), "--no-progress"],
                       capture_output=True, text=True, env={**ENV, "HOME": str(home)}, cwd=home, preexec_fn=drop,
                       timeout=300)
    assert r.returncode == 1 and "cannot write to" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list((tmp_path / "ro").iterdir()) == []


# Writing a file by any other route than prefcache.core.atomic: a rename, a temporary name, a direct write.
_OTHER_WRITERS = re.compile(r"os\.replace\(|os\.rename\(|\.rename\(|mkstemp\(|mkdtemp\(|\.write_text\(|\.write_bytes\(|"
                            r"open\([^)]*[\"'][wa]b?[\"']")
# Files no user reads, each written once into a private temporary folder or as a lock.
_ALLOWED = {"atomic.py", "locking.py", "lmeval_tasks.py"}
_ALLOWED_LINES = ('tempfile.mkdtemp(prefix="prefcache-sql-")',)  # DuckDB's private spill folder, removed on close


def test_every_module_writes_files_through_prefcache_atomic():
    root = Path(prefcache.__file__).parent
    found = [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in sorted(root.rglob("*.py")) if p.name not in _ALLOWED
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if _OTHER_WRITERS.search(line) and not any(ok in line for ok in _ALLOWED_LINES)]
    assert found == []


def test_json_and_parquet_writers(tmp_path, umask022):
    write_json_atomic({"b": 1, "a": Path("x")}, tmp_path / "run.json")
    assert (tmp_path / "run.json").read_text() == '{\n  "a": "x",\n  "b": 1\n}'
    write_table_atomic(pa.table({"id": ["a"]}), tmp_path / "t.parquet")
    assert pq.read_table(tmp_path / "t.parquet").column("id").to_pylist() == ["a"]
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "t.parquet"]


def test_publish_dir_can_keep_a_folder_another_process_made(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "config.json").write_text("theirs")
    tmp = make_temp_dir(final)
    (tmp / "config.json").write_text("ours")
    assert publish_dir(tmp, final, keep_existing=True) == final
    assert (final / "config.json").read_text() == "theirs" and not tmp.exists()
    tmp = make_temp_dir(final)
    (tmp / "config.json").write_text("ours")
    publish_dir(tmp, final)
    assert (final / "config.json").read_text() == "ours"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
