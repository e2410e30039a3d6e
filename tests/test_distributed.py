"""distributed: rank and world from the launcher's environment; a single process needs no process group."""

from __future__ import annotations

import torch

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
