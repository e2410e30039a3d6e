"""What the one training loop (:mod:`prefcache.training.loop`) asks of a kind of example, and the named
results that travel between them.

A kind of example is a *task*: :class:`~prefcache.training.pairs.PairTask` (preference pairs) or
:class:`~prefcache.training.unpaired.UnpairedTask` (KTO-style examples). A task

- loads its training and held-out examples and their reference values, with every check, before a
  model loads (``Task.load(cfg, tokenizer)``, a classmethod that returns the task built whole);
- runs the forward of one micro-batch (:meth:`forward` -> :class:`Forward`);
- scores its share of the held-out split (:meth:`evaluate` -> :class:`Totals`);
- turns per-example columns into step metrics (:meth:`metrics`) and writes ``pairs.parquet``
  (:meth:`write_texts`).

Everything else (ranks, the policy, optimizer and schedule, DDP, autocast, the data order, gradient
accumulation, the NaN guard, clipping, logs, evals, checkpoints, trackers) is the loop's, written once.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from prefcache.data.rows import TokenRows
from prefcache.training.vision import batch_vision


@dataclass(frozen=True)
class TaskData:
    """What every task holds, whatever its kind of example: the run's options, the training and held-out
    examples (views of data stores), the stores of both splits (their texts go to ``pairs.parquet``), the bad
    rows, and the tokenisation its cache was made with. A task adds its reference values and its objective."""

    cfg: object  # TrainConfig
    train_set: TokenRows
    eval_set: TokenRows | list
    texts: list
    bad_rows: list
    max_length: int
    truncation: str


def autocast_for(device: str, bf16: bool):
    """The autocast context of a policy forward: bf16 on CUDA when asked for, else none (CPU runs fp32)."""
    if bf16 and str(device).startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass(frozen=True)
class PolicyModel:
    """The policy as a step runs it: built once per run by the loop."""

    module: torch.nn.Module  # LogProbModule over the policy, DDP-wrapped under torchrun: the training forward
    plain: torch.nn.Module  # the same LogProbModule, never wrapped: passes without gradient (KL, eval)
    policy: torch.nn.Module  # the causal LM (PEFT-wrapped for LoRA)
    params: list  # the trainable parameters
    sharing: bool  # packed rows: the prompt computed once for all of an example's completions
    aux_coef: float | None  # MoE: the model's own weight of its router load-balancing loss
    pad_id: int
    device: str
    chunk_size: int
    bf16: bool
    processor: object = None  # a vision-language model's processor (None: a text model)

    def autocast(self):
        return autocast_for(self.device, self.bf16)

    def vision(self, batch) -> dict | None:
        """The image tensors of a batch of pairs (None: a text model): :func:`~prefcache.training.vision.batch_vision`."""
        return batch_vision(batch, self.processor)

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """The router load-balancing loss of the last training forward (None: a dense model)."""
        return self.plain.aux_loss


@dataclass(frozen=True)
class Forward:
    """One micro-batch through the policy."""

    loss: torch.Tensor  # scalar: the micro-batch's mean loss, with its graph
    losses: torch.Tensor  # [B] per-example losses (the NaN guard reads them)
    columns: dict[str, list]  # per-example log columns (logs/examples-*.parquet)
    n_tokens: int  # real tokens computed, prompts included
    n_positions: int  # positions computed, padding included
    kl: float | None = None  # KTO's batch KL estimate z


@dataclass
class Totals:
    """Sums over the examples one rank saw in a step (or an eval), gathered to rank 0 and logged there."""

    columns: dict[str, list] = field(default_factory=dict)
    loss_sum: float = 0.0  # Σ per-example loss
    n: int = 0
    tokens: int = 0
    positions: int = 0
    kl_sum: float | None = None  # Σ (micro-batch KL estimate x its examples)
    aux_sum: float | None = None  # Σ (router loss x examples)
    peak_mem_mb: float = 0.0

    def add(self, out: Forward, n: int, aux: torch.Tensor | None = None) -> None:
        for k, v in out.columns.items():
            self.columns.setdefault(k, []).extend(v)
        self.loss_sum += out.loss.item() * n
        self.n += n
        self.tokens += out.n_tokens
        self.positions += out.n_positions
        if out.kl is not None:
            self.kl_sum = (self.kl_sum or 0.0) + out.kl * n
        if aux is not None:
            self.aux_sum = (self.aux_sum or 0.0) + aux.item() * n

    @staticmethod
    def merge(parts: list[Totals]) -> Totals:
        """Every rank's totals as one (rank order, so the example columns follow the ranks)."""
        out = Totals(peak_mem_mb=max(p.peak_mem_mb for p in parts))
        for p in parts:
            for k, v in p.columns.items():
                out.columns.setdefault(k, []).extend(v)
            out.loss_sum, out.n = out.loss_sum + p.loss_sum, out.n + p.n
            out.tokens, out.positions = out.tokens + p.tokens, out.positions + p.positions
            if p.kl_sum is not None:
                out.kl_sum = (out.kl_sum or 0.0) + p.kl_sum
            if p.aux_sum is not None:
                out.aux_sum = (out.aux_sum or 0.0) + p.aux_sum
        return out

    def mean(self, total: float | None) -> float | None:
        return None if total is None or not self.n else total / self.n
