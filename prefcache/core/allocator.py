"""Choose the CPU memory allocator for heavy commands, by re-executing once with jemalloc preloaded.

Measured on a 2-core CPU machine (SmolLM2-135M, LoRA forward+backward, batch 8 x 128 tokens; see the
README's benchmarks): glibc malloc fragments under PyTorch's pattern of large, short-lived tensors, so
peak RSS was ~4.1 GB with glibc and ~2.8 GB with jemalloc, and glibc's mmap/munmap churn made steps
slower. jemalloc is used when its library is on the machine (Debian/Ubuntu: ``apt-get install
libjemalloc2``); nothing changes when it is not. Opt out with ``PREFCACHE_ALLOCATOR=system``; force a
library with ``PREFCACHE_ALLOCATOR=/path/to/libjemalloc.so``. GPU runs are unaffected either way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
MARK = "PREFCACHE_ALLOCATOR_SET"


def find_jemalloc() -> str | None:
    choice = os.environ.get("PREFCACHE_ALLOCATOR", "auto")
    if choice == "system":
        return None
    if choice != "auto":
        return choice if Path(choice).exists() else None
    return next((p for p in CANDIDATES if Path(p).exists()), None)


def current() -> str:
    """What this process runs on, for logs and benchmark tables."""
    return "jemalloc" if "jemalloc" in os.environ.get("LD_PRELOAD", "") else "system (glibc malloc)"


def started_as_prefcache(argv: list[str]) -> bool:
    """``prefcache ...`` (console script) or ``python -m prefcache ...``."""
    if Path(argv[1] if len(argv) > 1 else "").name == "prefcache" or Path(argv[0]).name == "prefcache":
        return True
    return any(a == "-m" and b == "prefcache" for a, b in zip(argv, argv[1:], strict=False))


def maybe_reexec() -> None:
    """Re-exec this very command line with jemalloc preloaded, once. A no-op when already done,
    when opted out, when no jemalloc is installed, or when not on Linux."""
    if os.environ.get(MARK) or "jemalloc" in os.environ.get("LD_PRELOAD", "") or not sys.platform.startswith("linux"):
        return
    lib = find_jemalloc()
    if lib is None:
        return
    argv = getattr(sys, "orig_argv", None)
    if not argv or not started_as_prefcache(argv):
        return  # e.g. called in-process from a notebook or a test runner: never replace that process
    env = dict(os.environ)
    env[MARK] = "1"
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD")) if x)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
