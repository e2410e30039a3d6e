"""The jemalloc re-exec: only for real prefcache command lines, exactly once, with an opt-out."""

from __future__ import annotations

import os
import subprocess
import sys

from prefcache.core.allocator import find_jemalloc, started_as_prefcache


def test_only_prefcache_command_lines_are_re_executed():
    assert started_as_prefcache(["/usr/bin/python3", "-m", "prefcache", "train"])
    assert started_as_prefcache(["/usr/bin/python3", "/venv/bin/prefcache", "train"])
    assert not started_as_prefcache(["/usr/bin/python3", "-m", "pytest", "tests"])
    assert not started_as_prefcache(["/usr/bin/python3", "-c", "import prefcache"])


def test_opt_out(monkeypatch):
    monkeypatch.setenv("PREFCACHE_ALLOCATOR", "system")
    assert find_jemalloc() is None
    monkeypatch.setenv("PREFCACHE_ALLOCATOR", "/no/such/lib.so")
    assert find_jemalloc() is None


def allocator_of(env):
    out = subprocess.run([sys.executable, "-m", "prefcache", "env"], capture_output=True, text=True, check=True, timeout=300,
                         env={k: v for k, v in env.items() if k not in ("LD_PRELOAD", "PREFCACHE_ALLOCATOR_SET")})
    return next(line for line in out.stdout.splitlines() if line.startswith("allocator")).split(None, 1)[1]


def test_heavy_commands_run_on_jemalloc_where_installed_unless_opted_out(monkeypatch):
    monkeypatch.setenv("PREFCACHE_ALLOCATOR", "auto")
    installed = find_jemalloc() is not None  # libjemalloc2 is on this project's machines; elsewhere: glibc, as documented
    assert allocator_of({**os.environ, "PREFCACHE_ALLOCATOR": "auto"}) == ("jemalloc" if installed else "system (glibc malloc)")
    assert allocator_of({**os.environ, "PREFCACHE_ALLOCATOR": "system"}).startswith("system")
