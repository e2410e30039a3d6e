"""A model sharded across the ranks with PyTorch's own FSDP2 (``fully_shard``), for every pass that runs one:
the reference pass (``precompute --fsdp``), scoring (``score --fsdp``) and training (``train --fsdp``).

Each decoder layer is one FSDP unit, then the kernel's :class:`~prefcache.model.kernel.LogProbModule` over the
model is the root (embeddings, final norm and output head: tied weights stay in one unit). Every pass goes
through that root, so its forward hook gathers the root's weights before the kernel calls the backbone and the
head. Each rank holds 1/N of the weights (and, in training, of the gradients and optimizer state); a layer's
weights are gathered only while it runs.

A forward of a sharded model is a collective: every rank must run it, as often as the others. Training steps
are alike on every rank by construction; a pass that splits examples across ranks (each rank scores its share)
is not, so :class:`Lockstep` keeps the ranks' forwards matched.
"""

from __future__ import annotations

import torch
from torch import nn

from prefcache.model.kernel import _unwrap


def decoder_layers(model) -> list[nn.Module]:
    """The model's transformer blocks, the units FSDP shards one at a time (transformers' ``_no_split_modules``,
    the same classes accelerate's FSDP auto-wrap uses)."""
    lm = _unwrap(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--fsdp: {type(lm).__name__} names no decoder layer class (_no_split_modules) to shard by")
    return layers


def shard(module: nn.Module, model, device: str, bf16: bool = False) -> nn.Module:
    """``module`` (the LogProbModule over ``model``) sharded in place with ``fully_shard``: each decoder layer,
    then the root. bf16 weights for compute and fp32 gradient reduction on CUDA with ``bf16``; otherwise the
    weights keep their own dtype. Weights still on the CPU move to the device mesh's device, shard by shard, so
    a model bigger than one device can be loaded on the host and sharded onto the devices."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()  # fp32 on CPU: gloo, and the numbers of an unsharded run
    if bf16 and device.startswith("cuda"):
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    # A 4-bit weight's packed bytes stored in another float dtype than param_dtype would be cast as numbers,
    # i.e. destroyed (bitsandbytes then fails on the gathered weight's shape): load_model(shardable=True)
    # stores them in the 4-bit compute dtype, bf16 on CUDA.
    packed = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit" and p.dtype.is_floating_point}
    if mp.param_dtype is not None and packed - {mp.param_dtype}:
        raise ValueError(f"--fsdp: 4-bit weights stored as {sorted(map(str, packed))} cannot be gathered in "
                         f"{mp.param_dtype}: load the model with shardable=True")
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


class Lockstep(nn.Module):
    """A sharded module whose ranks run different numbers of forwards (each scores its own share of examples).

    Before each forward every rank votes whether it has one to run (a one-number all-reduce); a rank whose share
    is done calls :meth:`drain`, which runs a two-token forward for as long as another rank still votes yes, so
    every layer's all-gather meets its partners on the other ranks. ``.module`` is the LogProbModule, so the
    kernel's callers (``pair_logps``, ``packed_token_logprobs``) run it as they run a DDP-wrapped one.
    Without sharding there is nothing to keep in step: use the module itself.
    """

    def __init__(self, module: nn.Module, device: str, pad_id: int):
        super().__init__()
        self.module, self.device, self.pad_id = module, device, pad_id

    @property
    def model(self) -> nn.Module:
        """The model under the LogProbModule (what the kernel's callers check and mask for)."""
        return self.module.model

    def forward(self, *args, **kwargs):
        self._vote(True)
        return self.module(*args, **kwargs)

    def drain(self) -> int:
        """Keep the other ranks company until every rank's share is done; returns the forwards it ran."""
        ran = 0
        while self._vote(False):
            ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
            with torch.no_grad():
                self.module(ids, torch.ones_like(ids), torch.tensor([[0, 1]], device=self.device))
            ran += 1
        return ran

    def _vote(self, busy: bool) -> bool:
        """Whether any rank is busy (every rank calls this once per round)."""
        import torch.distributed as tdist

        flag = torch.tensor([int(busy)], device=self.device)
        tdist.all_reduce(flag)
        return bool(flag.item())


def unsharded_note(command: str) -> str:
    """What ``--fsdp`` means without torchrun, said once by the command."""
    return (f"prefcache {command}: note: --fsdp with one process runs unsharded (launch with torchrun "
            "--nproc-per-node N to shard)")


def local_mb(module: nn.Module) -> float:
    """MB of ``module``'s parameters held on this rank: its shards when sharded (call it before a forward gathers
    them), every weight otherwise."""
    from torch.distributed.tensor import DTensor

    local = (p.to_local() if isinstance(p, DTensor) else p for p in module.parameters())
    return sum(t.numel() * t.element_size() for t in local) / 2**20


def share(n: int, rank: int, world: int) -> range:
    """The positions of ``n`` examples one rank scores: a contiguous block, the first ``n % world`` ranks one
    more, so that gathering the ranks' results in rank order gives the examples' own order."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))
