"""Preference losses: one small pure function per method, chosen by name from ``LOSSES``.

Conventions shared by every function here:
- Log-probs are per-example **summed** completion log-probs in nats, shape [B]: policy_chosen_logps,
  policy_rejected_logps, ref_chosen_logps, ref_rejected_logps. Token counts (chosen_tokens,
  rejected_tokens) are float tensors [B] of completion tokens; losses that need averages divide inside.
- Each returns ``LossOutput(losses [B], chosen_rewards [B], rejected_rewards [B])``, unreduced (the
  caller takes the mean). Rewards are DPO's implicit rewards beta * (policy - ref), detached
  (reference-free orpo and simpo: beta * per-token policy log-probs, as TRL logs them).
- Docstring notation: Δc = π_c - ref_c and Δr = π_r - ref_r (log-ratios), h = Δc - Δr, σ = sigmoid,
  ε = label_smoothing.

The formulas follow TRL's ``DPOTrainer`` loss types (trl 1.x ``_compute_loss``), ``CPOTrainer``
(simpo) and ``ORPOTrainer`` (orpo). Where a function differs, its docstring says "Deviation from TRL".
"""

from prefcache.losses.combine import (
           LOSSES,
           CombinedLoss,
           LossInputs,
           LossSpec,
           RunningMean,
           check_loss_options,
           combined_loss,
)
from prefcache.losses.pairs import F_DIVERGENCES, LossOutput, f_scores, ld_logps, wpo_weights

__all__ = ["F_DIVERGENCES", "LOSSES", "CombinedLoss", "LossInputs", "LossOutput", "LossSpec", "RunningMean",
           "check_loss_options", "combined_loss", "f_scores", "ld_logps", "wpo_weights"]
