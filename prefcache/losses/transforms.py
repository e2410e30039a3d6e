"""What is applied around a pair loss: f-DPO's scores (in place of the log-ratio margin), LD-DPO's length
weighting of the log-probs, and WPO's per-pair weights. Pure functions of [B] tensors (nats).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefcache.losses.registry import F_DIVERGENCES


def f_scores(chosen: Tensor, rejected: Tensor, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5) -> tuple[Tensor, Tensor]:
    """f-DPO (Wang et al., 2023, arXiv:2309.16240, Thm. 1): the log-ratios u = log(π/π_ref) replaced by f'(e^u).

    reverse_kl: u (plain DPO); forward_kl: 1 - e^(-u); js_divergence: log 2 + log σ(u);
    alpha_divergence: (e^((α-1) u) - 1) / (α-1), u's limit at α = 1, exponent clamped at 80 (TRL's fp32 bound).
    Applied, as in TRL 1.16, to the *summed* sequence log-ratios, so no per-token values are needed.
    """
    if f_divergence == "reverse_kl":
        return chosen, rejected
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-chosen), 1 - torch.exp(-rejected)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(chosen), math.log(2) + F.logsigmoid(rejected)
    if f_divergence == "alpha_divergence":
        if abs(f_alpha - 1.0) < 1e-6:  # f'(t) -> log t: reverse KL
            return chosen, rejected
        a = f_alpha - 1.0
        return ((torch.exp(torch.clamp(a * chosen, max=80.0)) - 1) / a,
                (torch.exp(torch.clamp(a * rejected, max=80.0)) - 1) / a)
    raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}")


def ld_logps(logps: Tensor, logps_prefix: Tensor, alpha: float) -> Tensor:
    """LD-DPO length desensitisation (Liu et al., 2024, arXiv:2409.06411).

    logps_prefix is the sum over the first min(n_chosen, n_rejected) completion tokens (the cache's
    *_logps_prefix columns); the tail beyond it is down-weighted by alpha:
    ld = prefix + alpha * (logps - prefix). alpha = 1 gives plain logps; alpha = 0 keeps only the
    shared-length prefix. Same as TRL's ``ld_alpha``. Apply it to policy and reference log-probs alike
    before a loss (``combined_loss(..., ld_alpha=...)`` does this for every loss but sft).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1], got {alpha}")
    return logps_prefix + alpha * (logps - logps_prefix)


def wpo_weights(chosen_aligned: Tensor, rejected_aligned: Tensor) -> Tensor:
    """WPO pair weights (Zhou et al., 2024, arXiv:2406.11827, eq. 2, as TRL 1.16 computes them), [B], detached.

    ``*_aligned`` [B]: the policy's mean over completion tokens of log p(y_t) - log Σ_v p(v)², i.e. the
    per-token log-prob relative to the distribution's own "sharpness" (``scoring.pair_logps(wpo=True)``
    computes it). w = exp(ā_c) * exp(ā_r) weights each pair by how on-policy both completions are.
    These are the *policy's* per-token values: the reference cache needs nothing extra.
    """
    return torch.exp(chosen_aligned + rejected_aligned).detach()
