"""Preference losses: one small pure function per method, chosen by name.

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

Modules: ``registry`` (every loss's name and options, torch-free: the CLI and the option checks read it),
``pairs`` (the pair losses), ``transforms`` (f-DPO, LD-DPO, WPO), ``unpaired`` (kto, apo_zero_unpaired), ``combine`` (the objective of a step:
weighted losses, LD-DPO, WPO, bco_pair's running mean). The torch names below load on first use.
"""

from prefcache.losses.registry import F_DIVERGENCES, PAIR_LOSSES, UNPAIRED_LOSSES, check_loss_options

_LAZY = {
    "LOSSES": "combine", "CombinedLoss": "combine", "LossInputs": "combine", "LossSpec": "combine",
    "RunningMean": "combine", "combined_loss": "combine",
    "LossOutput": "pairs", "f_scores": "transforms", "ld_logps": "transforms", "wpo_weights": "transforms",
}

__all__ = ["F_DIVERGENCES", "PAIR_LOSSES", "UNPAIRED_LOSSES", "check_loss_options", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"prefcache.losses.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'prefcache.losses' has no attribute {name!r}")
