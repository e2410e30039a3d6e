"""The pair losses: one small pure function per method (conventions in :mod:`prefcache.losses`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from prefcache.losses.transforms import f_scores


class LossOutput(NamedTuple):
    losses: Tensor  # [B], unreduced
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached


def _logratios(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None) -> tuple[Tensor, Tensor]:
    if rc is None or rr is None:
        raise ValueError("this loss needs reference log-probs (ref_chosen_logps, ref_rejected_logps)")
    return pc - rc, pr - rr


def _out(losses: Tensor, beta: float, chosen: Tensor, rejected: Tensor) -> LossOutput:
    return LossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


def _soft_bce(x: Tensor, eps: float) -> Tensor:
    """-(1-ε) log σ(x) - ε log σ(-x): cross-entropy against the soft label 1-ε."""
    return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


def _per_token(logps: Tensor, tokens: Tensor) -> Tensor:
    return logps / tokens.clamp(min=1.0)  # clamp as TRL: an empty completion must not divide by zero




def sigmoid(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
            beta: float = 0.1, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
            f_alpha: float = 0.5) -> LossOutput:
    """DPO (Rafailov et al., 2023, arXiv:2305.18290, eq. 7); with ε > 0 conservative DPO (cDPO).

    loss = -(1-ε) log σ(β h) - ε log σ(-β h). ε = 0 is plain DPO. cDPO (Mitchell, 2023, "A note on
    DPO with noisy preferences") is the expected DPO loss when each label is flipped with probability ε.
    Deviation from TRL: trl 1.x dropped label smoothing from "sigmoid"; this is the trl 0.x formula,
    identical at the default ε = 0. With ``f_divergence`` (f-DPO), h is computed from :func:`f_scores`.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    return _out(_soft_bce(beta * (sc - sr), label_smoothing), beta, c, r)


def hinge(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
          beta: float = 0.1, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> LossOutput:
    """SLiC-HF hinge loss (Zhao et al., 2023, arXiv:2305.10425), as used by RSO (arXiv:2309.06657).

    loss = max(0, 1 - β h); 1/β is the margin the log-ratio difference must reach.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    return _out(torch.relu(1 - beta * (sc - sr)), beta, c, r)


def ipo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
        beta: float = 0.1, chosen_tokens: Tensor, rejected_tokens: Tensor, f_divergence: str = "reverse_kl",
        f_alpha: float = 0.5) -> LossOutput:
    """IPO (Azar et al., 2023, arXiv:2310.12036, eq. 17); β is the paper's τ.

    loss = (Δc/n_c - Δr/n_r - 1/(2β))², with n the completion token counts. Like TRL, the log-ratios
    are averaged per token (TRL: confirmed with the IPO authors) so the squared loss does not grow with
    length. Rewards stay β * (summed) log-ratios.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    h = _per_token(sc, chosen_tokens) - _per_token(sr, rejected_tokens)
    return _out((h - 1 / (2 * beta)) ** 2, beta, c, r)


def robust(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
           beta: float = 0.1, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
           f_alpha: float = 0.5) -> LossOutput:
    """Robust DPO, rDPO (Chowdhury et al., 2024, arXiv:2403.00409); ε = label flip rate.

    loss = [(1-ε) ℓ(h) - ε ℓ(-h)] / (1 - 2ε), ℓ(h) = -log σ(β h). Unbiased: averaging it over a label
    flipped with probability ε gives back ℓ(h). Needs 0 <= ε < 0.5.
    """
    eps = label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust: label_smoothing (the flip rate) must be in [0, 0.5), got {eps}")
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    x = beta * (sc - sr)
    losses = (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    return _out(losses, beta, c, r)


def exo_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, label_smoothing: float = 0.0, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5) -> LossOutput:
    """EXO, pairwise (Ji et al., 2024, arXiv:2402.00856, eq. 16): KL(p_θ || p_label) over the pair.

    With p_θ = σ(±β h) and label distribution (1-ε, ε):
    loss = σ(β h) (log σ(β h) - log(1-ε)) + σ(-β h) (log σ(-β h) - log ε).
    ε must be in (0, 1): at ε = 0 the loss is +inf (log 0), so it is refused, as TRL 1.16 refuses it;
    the EXO paper uses ε = 1e-3.
    """
    eps = label_smoothing
    if not 0 < eps < 1:
        raise ValueError(f"exo_pair: label_smoothing must be in (0, 1) (the EXO paper uses 1e-3), got {label_smoothing}")
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    x = beta * (sc - sr)
    losses = (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
              + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    return _out(losses, beta, c, r)


def nca_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1) -> LossOutput:
    """NCA, pairwise (Chen et al., 2024, arXiv:2402.05369), K = 1.

    loss = -log σ(β Δc) - ½ log σ(-β Δc) - ½ log σ(-β Δr). Unlike DPO it anchors each reward on its
    own: the chosen reward is pushed up only until β Δc = ln 2.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    return _out(losses, beta, c, r)


def bco_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, bco_delta: float | Tensor = 0.0) -> LossOutput:
    """BCO, pairwise (Jung et al., 2024, arXiv:2404.04656).

    loss = -log σ(β Δc - δ) - log σ(-(β Δr - δ)). δ is the reward shift: a running mean of the
    (detached) rewards β Δc and β Δr over training. This function is pure, so the trainer keeps that
    running mean and passes it in as ``bco_delta`` (trl 0.x updated it with the current batch first).
    Deviation from TRL: trl 1.x dropped δ (equal to the default bco_delta = 0).
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -F.logsigmoid(beta * c - bco_delta) - F.logsigmoid(-(beta * r - bco_delta))
    return _out(losses, beta, c, r)


def sppo_hard(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
              beta: float = 0.1) -> LossOutput:
    """SPPO, hard-label version (Wu et al., 2024, arXiv:2405.00675, eq. 4.7 with P = 1 / 0).

    loss = (Δc - 1/(2β))² + (Δr + 1/(2β))²: each log-ratio regresses to its own target.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _out((c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2, beta, c, r)


def aot(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
        beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, paired (Melnyk et al., 2024, arXiv:2406.05882): DPO on sorted margins.

    d = sort_B(π_c - π_r) - sort_B(ref_c - ref_r); loss = -(1-ε) log σ(β d) - ε log σ(-β d).
    The sort runs over the batch (first-order stochastic dominance of the margin distribution), so
    losses[i] belongs to the i-th quantile, not to example i. Rewards are per example, as usual.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    policy_sorted = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0).values
    d = policy_sorted - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0).values
    return _out(_soft_bce(beta * d, label_smoothing), beta, c, r)


def aot_unpaired(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                 beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """AOT, unpaired (Melnyk et al., 2024, arXiv:2406.05882): chosen vs rejected reward distributions.

    d = sort_B(Δc) - sort_B(Δr); loss = -(1-ε) log σ(β d) - ε log σ(-β d). losses[i] is per quantile.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    d = torch.sort(c, dim=0).values - torch.sort(r, dim=0).values
    return _out(_soft_bce(beta * d, label_smoothing), beta, c, r)


def apo_zero(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1) -> LossOutput:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 7): chosen better than the model.

    loss = (1 - σ(β Δc)) + σ(β Δr): raise the chosen likelihood, lower the rejected one.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _out((1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r), beta, c, r)


def apo_down(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1) -> LossOutput:
    """APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, eq. 8): chosen worse than the model.

    loss = σ(β Δc) + (1 - σ(β h)): lower both likelihoods, the rejected one more.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _out(torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * (c - r))), beta, c, r)


def discopop(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float = 0.1, discopop_tau: float = 0.05, f_divergence: str = "reverse_kl",
             f_alpha: float = 0.5) -> LossOutput:
    """DiscoPOP / log-ratio modulated loss (Lu et al., 2024, arXiv:2406.08414, eq. 5).

    With x = β h and m = σ(x/τ): loss = (1 - m) (-log σ(x)) + m exp(-x), a blend of the logistic
    (DPO) and exponential losses. The paper's τ = 0.05 is the default. m exp(-x) is computed as
    exp(-x + log σ(x/τ)), the same value without 0 * inf = nan for very negative x. The loss is
    non-convex: near h = 0 (x in about [-0.12, 0.07] at τ = 0.05) its gradient pushes the margin down.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    x = beta * (sc - sr)
    mod = torch.sigmoid(x / discopop_tau)
    losses = -F.logsigmoid(x) * (1 - mod) + torch.exp(-x + F.logsigmoid(x / discopop_tau))
    return _out(losses, beta, c, r)


def sigmoid_norm(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
                 beta: float = 0.1, chosen_tokens: Tensor, rejected_tokens: Tensor, f_divergence: str = "reverse_kl",
                 f_alpha: float = 0.5) -> LossOutput:
    """Length-normalised DPO (Tülu 3: Lambert et al., 2024, arXiv:2411.15124).

    loss = -log σ(β (Δc/n_c - Δr/n_r)), n = completion token counts; per-token log-ratios remove
    DPO's preference for longer answers. TRL 1.16's ``sigmoid_norm`` (same formula; open-instruct's
    "dpo_norm"). Rewards stay β * (summed) log-ratios.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    sc, sr = f_scores(c, r, f_divergence, f_alpha)
    h = _per_token(sc, chosen_tokens) - _per_token(sr, rejected_tokens)
    return _out(-F.logsigmoid(beta * h), beta, c, r)


def sft(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
        beta: float = 0.1, chosen_tokens: Tensor) -> LossOutput:
    """Negative log-likelihood of the chosen completion, per token (the SFT term of RPO, Pang et al.,
    2024, arXiv:2404.19733, and of MPO, Wang et al., 2024, arXiv:2411.10442).

    TRL's "sft" is the cross-entropy averaged over all chosen tokens in the batch,
    -Σ_i π_c,i / Σ_i n_c,i. Here losses[i] = -π_c,i * B / Σ_j n_c,j, example i's share of it, so
    losses.mean() equals TRL's value exactly (gradients included). Does not need the reference;
    rewards are β (π - ref), or β π when ref is None.
    """
    batch = policy_chosen_logps.shape[0]
    losses = -policy_chosen_logps * (batch / chosen_tokens.clamp(min=1.0).sum())
    if ref_chosen_logps is None or ref_rejected_logps is None:
        return _out(losses, beta, policy_chosen_logps, policy_rejected_logps)
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _out(losses, beta, c, r)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x (Mächler, 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
         beta: float = 0.1, chosen_tokens: Tensor, rejected_tokens: Tensor) -> LossOutput:
    """ORPO odds-ratio term (Hong et al., 2024, arXiv:2403.07691, eqs. 4 and 7); reference-free.

    With per-token averages a = π/n and odds(a) = e^a / (1 - e^a):
    loss = -β log σ(log odds(a_c) - log odds(a_r)). β plays the paper's λ, as in TRL's ORPOTrainer.
    This is only the odds-ratio term: the full ORPO objective adds the chosen NLL, i.e.
    ``combined_loss(["orpo", "sft"], ...)``. Rewards follow TRL's ORPO: β * a (per-token average
    policy log-probs); ref_* are ignored.
    """
    ac = _per_token(policy_chosen_logps, chosen_tokens)
    ar = _per_token(policy_rejected_logps, rejected_tokens)
    log_odds = (ac - ar) - (_log1mexp(ac) - _log1mexp(ar))
    return _out(-beta * F.logsigmoid(log_odds), beta, ac, ar)


def simpo(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
          beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
          chosen_tokens: Tensor, rejected_tokens: Tensor) -> LossOutput:
    """SimPO (Meng et al., 2024, arXiv:2405.14734, eq. 6); reference-free.

    loss = -log σ(β π_c/n_c - β π_r/n_r - γ), γ = simpo_gamma (target reward margin); with ε > 0 the
    label-smoothed form of TRL's CPOTrainer. Defaults are TRL's (β = 0.1, γ = 0.5); the paper uses
    β ≈ 2-10. Rewards follow TRL: β * per-token average policy log-probs; ref_* are ignored.
    """
    ac = _per_token(policy_chosen_logps, chosen_tokens)
    ar = _per_token(policy_rejected_logps, rejected_tokens)
    return _out(_soft_bce(beta * (ac - ar) - simpo_gamma, label_smoothing), beta, ac, ar)




