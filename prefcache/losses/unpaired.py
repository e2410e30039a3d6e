"""Losses on unpaired examples (TRL's KTO format): KTO and unpaired APO-zero.

They follow TRL 1.16's ``KTOTrainer._compute_loss``. Δ = log π(y|x) - log π_ref(y|x) (summed
completion log-probs, nats), z = the batch KL estimate, w_d / w_u = desirable / undesirable weights:
- ``kto`` (Ethayarajh et al., 2024, arXiv:2402.01306, eq. 7): desirable w_d (1 - σ(β(Δ - z))),
  undesirable w_u (1 - σ(β(z - Δ))).
- ``apo_zero_unpaired`` (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7 unpaired): desirable
  w_d (1 - σ(βΔ)), undesirable w_u σ(βΔ); no KL term.
z = max(0, mean_batch(log π(y'|x) - log π_ref(y'|x))) over the KL completions y' (mismatched completions,
see :mod:`prefcache.data.unpaired`), without gradient. At step 0 (policy = reference) Δ = 0 and z = 0, so
every example's kto loss is 0.5 at unit weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from prefcache.losses.registry import UNPAIRED_LOSSES


class UnpairedOutput(NamedTuple):
    losses: Tensor  # [B], unreduced, weights applied
    rewards: Tensor  # [B], β Δ, detached


def kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor, reduce=None) -> Tensor:
    """TRL's KTO reference point: max(0, mean(π(y'|x) - π_ref(y'|x))) over the batch, detached (scalar).
    ``reduce``: averages the per-process means before the clamp (TRL's gather, under torchrun)."""
    mean = (policy_kl_logps - ref_kl_logps).mean().detach()
    return (reduce(mean) if reduce else mean).clamp(min=0)


def kto(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor | float, *, beta: float = 0.1,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> UnpairedOutput:
    """KTO per example [B]; ``labels`` [B] bool (True = desirable); ``kl`` the batch estimate z."""
    delta = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (delta - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - delta)))
    return UnpairedOutput(torch.where(labels, desirable, undesirable), (beta * delta).detach())


def apo_zero_unpaired(policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl=None, *, beta: float = 0.1,
                      desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> UnpairedOutput:
    """Unpaired APO-zero per example [B]: raise desirable likelihoods, lower undesirable ones; ``kl`` unused."""
    delta = policy_logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * delta))
    undesirable = undesirable_weight * torch.sigmoid(beta * delta)
    return UnpairedOutput(torch.where(labels, desirable, undesirable), (beta * delta).detach())


# name -> (function, takes the KL estimate), as the registry declares them
UNPAIRED = {name: (globals()[name], info.kl) for name, info in UNPAIRED_LOSSES.items()}


@dataclass(frozen=True)
class UnpairedObjective:
    """An unpaired loss bound once per run to its options (checked then), called per micro-batch."""

    name: str
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.name not in UNPAIRED:
            raise ValueError(f"unknown unpaired loss {self.name!r}; choose from {', '.join(UNPAIRED)}")

    @property
    def needs_kl(self) -> bool:
        """Whether the loss takes KTO's batch KL estimate z (so each example needs its KL completion)."""
        return UNPAIRED[self.name][1]

    def __call__(self, policy_logps: Tensor, ref_logps: Tensor, labels: Tensor, kl: Tensor) -> UnpairedOutput:
        return UNPAIRED[self.name][0](policy_logps, ref_logps, labels, kl, beta=self.beta,
                                      desirable_weight=self.desirable_weight,
                                      undesirable_weight=self.undesirable_weight)
