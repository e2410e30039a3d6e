"""Data parallelism under ``torchrun`` / ``accelerate launch``: which process this is, the process group,
each rank's device, and the few collectives prefcache uses (all no-ops in a single process).

:func:`dist_info` reads the launcher's environment only, so the directory lock and the fast refusals
use it before torch loads; everything else imports torch when called.
"""

from __future__ import annotations

import atexit
import os


def dist_info() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment (torchrun and accelerate both set these)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: str) -> None:
    """Join the process group the launcher (torchrun, accelerate) set up: nccl on GPUs, gloo on CPU."""
    import torch
    import torch.distributed as tdist

    if not tdist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        tdist.init_process_group("nccl" if cuda else "gloo")
        # Left to interpreter shutdown, gloo's worker threads are torn down in static destructors and the
        # process can abort ("terminate called without an active exception") after the job succeeded.
        atexit.register(_destroy_group)


def _destroy_group() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()


def setup(device: str) -> tuple[int, int, str]:
    """(rank, world_size, this rank's device) for a resolved ``device`` (cpu, cuda, cuda:N, mps).

    Under a launcher: joins the process group, and on GPUs gives each rank the GPU of its LOCAL_RANK
    (made the current device, as nccl wants). A single process keeps ``device`` as given.
    """
    rank, world = dist_info()
    if world > 1:
        init_distributed(device)
        if device.startswith("cuda"):
            import torch

            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
    return rank, world, device


def gather(obj, world: int) -> list:
    """Every rank's ``obj`` (a list of one without torchrun)."""
    if world == 1:
        return [obj]
    import torch.distributed as tdist

    parts = [None] * world
    tdist.all_gather_object(parts, obj)
    return parts


def barrier(world: int) -> None:
    """Wait for every rank (nothing to wait for in a single process, or outside a process group)."""
    if world == 1:
        return
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def all_reduce_sum(tensor, world: int):
    """``tensor`` summed over the ranks, in place (unchanged in a single process)."""
    if world > 1:
        import torch.distributed as tdist

        tdist.all_reduce(tensor)
    return tensor
