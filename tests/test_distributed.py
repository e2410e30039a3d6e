"""distributed: rank and world from the launcher's environment; a single process needs no process group;
two ranks under torchrun form a real one."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from conftest import ENV, free_port

from prefcache.core.distributed import all_reduce_sum, barrier, dist_info, gather, setup


def test_rank_and_world_from_the_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist_info() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert dist_info() == (3, 4)


def test_a_single_process_keeps_its_device_and_needs_no_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup("cpu") == (0, 1, "cpu")
    assert setup("cuda:1") == (0, 1, "cuda:1")  # no launcher: the device asked for, not LOCAL_RANK's
    assert not torch.distributed.is_initialized()
    assert gather({"a": 1}, 1) == [{"a": 1}]
    barrier(1)
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t, 1) is t and t.tolist() == [1.0, 2.0]


RANKS = """
import json, sys
import torch
from prefcache.core.distributed import all_reduce_sum, barrier, gather, setup
from prefcache.core.locking import directory_lock, lock_path

rank, world, device = setup("cpu")
with directory_lock(sys.argv[1], "prefcache precompute", rank=rank):  # each rank its own lock, at once
    barrier(world)  # both hold theirs here
    held = sorted(p.name for p in lock_path(sys.argv[1]).parent.glob(".prefcache-lock*"))
    parts = gather({"rank": rank, "held": held}, world)
    total = all_reduce_sum(torch.tensor([float(rank + 1)]), world).item()
    barrier(world)
if rank == 0:
    print(json.dumps({"world": world, "device": device, "parts": parts, "total": total}))
"""


def test_two_ranks_under_torchrun_form_a_group_and_each_takes_its_own_lock(tmp_path):
    """A real gloo group of two CPU processes (a free port, not a fixed one): gather, all_reduce_sum and
    barrier across ranks, and the per-rank directory locks held together."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        str(free_port()), str(script), str(tmp_path / "out")],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["world"] == 2 and out["device"] == "cpu" and out["total"] == 3.0
    assert [p["rank"] for p in out["parts"]] == [0, 1]
    assert all(p["held"] == [".prefcache-lock", ".prefcache-lock-r001"] for p in out["parts"])
    assert not list((tmp_path / "out").glob(".prefcache-lock*"))
