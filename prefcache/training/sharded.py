"""``train --fsdp``: the policy sharded across the ranks (:mod:`prefcache.model.sharding`: FSDP2, one unit per
decoder layer), and checkpoints of the sharded model and optimizer written with PyTorch's distributed checkpoint
(DCP).

Gradients are reduce-scattered as averages over the ranks (DDP's all-reduce, sharded), so a run
on N ranks takes the steps of one process on N times the pairs. On CUDA with ``--bf16`` the weights are
gathered in bf16 and the gradients reduced in fp32; on CPU (gloo) everything stays fp32. A QLoRA policy's 4-bit
base is sharded with the rest, its packed weights stored in the 4-bit compute dtype (bf16 on CUDA, fp32 on CPU:
:func:`~prefcache.model.load.load_model`'s ``shardable``), which FSDP shards and gathers as float weights; only
the adapter trains and is checkpointed. Tested on CPU (gloo); the CUDA path (nccl, bf16) has not been run.

A checkpoint of a ``--fsdp`` run holds ``sharded/`` (DCP: each rank writes its shard of the model and of the
optimizer state; a resume at another number of ranks re-shards it) besides the usual files, whose weights are
gathered onto rank 0 (``full_state_dict``, offloaded to CPU), so ``export``, ``eval`` and ``score`` read it as
any other. With one process (no torchrun) ``--fsdp`` trains unsharded and still writes ``sharded/``, so the run
can continue on more ranks and back.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

SHARDED_DIR = "sharded"  # in a checkpoint of a --fsdp run: the DCP files of the model and optimizer state


def note_unsharded(world: int, main: bool) -> None:
    """Say that ``--fsdp`` on one process trains unsharded."""
    if world == 1 and main:
        print("prefcache train: note: --fsdp with one process trains unsharded (launch with torchrun "
              "--nproc-per-node N to shard); its checkpoints can be resumed on any number of processes",
              file=sys.stderr)


def evaluate_share(task, model, run):
    """This rank's share of the held-out examples scored (``task.evaluate``'s Totals). Sharded (--fsdp on more
    than one rank), every forward is a collective and the shares differ in size: the sharded module runs behind a
    :class:`~prefcache.model.sharding.Lockstep`, which keeps the other ranks company once this share is done."""
    share = task.eval_share(run.rank, run.world)
    if not (run.cfg.fsdp and run.world > 1):
        return task.evaluate(model, share, run)
    from prefcache.model.sharding import Lockstep

    step = Lockstep(model.plain, model.device, model.pad_id)
    totals = task.evaluate(replace(model, module=step, plain=step), share, run)
    step.drain()
    return totals


def total_norm(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a number: over sharded gradients it is a DTensor of the partial norms."""
    from torch.distributed.tensor import DTensor

    return float((norm.full_tensor() if isinstance(norm, DTensor) else norm).item())


def save_sharded(folder: Path, module, optimizer) -> None:
    """The model and optimizer state, each rank writing its own shard (every rank calls this)."""
    import torch.distributed.checkpoint as dcp

    model_state, optim_state = _trained_state(module, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, module, optimizer) -> None:
    """Load :func:`save_sharded`'s files into ``module`` and ``optimizer`` at whatever number of ranks this run
    has (DCP re-shards; one process loads whole tensors). Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state, optim_state = _trained_state(module, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder))
    # Not strict: the frozen base is not in the files (dcp.load has already refused a trained weight missing there).
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_TRAINED_ONLY(strict=False))


def _trained_state(module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state of the weights that train, the same entries sharded or not.

    ``ignore_frozen_params`` drops each frozen parameter under one name only, and not what a module writes next
    to it. So a tied output head (``lm_head.weight``, the frozen embeddings under a second name) would be saved
    with the adapter, and so would bitsandbytes' ``Linear4bit`` quantization constants, plain tensors it writes as
    ``WEIGHT.absmax``, ``WEIGHT.quant_map``, ... while the weight is whole (a sharded 4-bit weight carries none:
    a one-process resume of a sharded QLoRA checkpoint would ask for entries its files lack). Like the frozen
    weights, they come from the base model the run loads.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(module, optimizer, options=_TRAINED_ONLY())
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    under = tuple(f"{name}." for name in frozen)
    return {k: v for k, v in model_state.items() if k not in frozen and not k.startswith(under)}, optim_state


def _TRAINED_ONLY(strict: bool = True):  # noqa: N802 - a constant, made when torch is imported
    """The weights that train (LoRA: the adapter's; full: all), not a frozen base the run loads from its model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=strict)


def full_policy_state(module, world: int) -> dict | None:
    """The policy's whole state dict on rank 0 (CPU tensors; ``{}`` on the other ranks), gathered from the
    shards; None when unsharded (the policy saves its own weights). Every rank calls this."""
    if world == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (embeddings and output head) come back as two gathered copies: one tensor again, so
    # save_pretrained writes it once, as it does for the model it was gathered from.
    tied: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    for first, *others in tied.values():
        for name in others:
            if first in state and name in state:
                state[name] = state[first]
    return {k.removeprefix("model."): v for k, v in state.items()}  # LogProbModule.model is the policy
