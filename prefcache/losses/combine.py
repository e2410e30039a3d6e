"""The objective a step optimises: named losses from the registry, weighted and summed (TRL's
``loss_type=[...]`` with ``loss_weights``), with LD-DPO's length weighting and WPO's pair weights applied,
and bco_pair's running reward mean carried across steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from torch import Tensor

from prefcache.losses.pairs import (
    F_DIVERGENCES,
    LossOutput,
    aot,
    aot_unpaired,
    apo_down,
    apo_zero,
    bco_pair,
    discopop,
    exo_pair,
    hinge,
    ipo,
    ld_logps,
    nca_pair,
    orpo,
    robust,
    sft,
    sigmoid,
    sigmoid_norm,
    simpo,
    sppo_hard,
    wpo_weights,
)


class LossSpec(NamedTuple):
    fn: Callable[..., LossOutput]
    needs_ref: bool
    inputs: tuple[str, ...] = ()  # LossInputs fields passed as keywords (token counts)
    options: tuple[str, ...] = ()  # keyword options besides beta
    uses_ld: bool = True  # ld_alpha transforms its log-probs (sft: an NLL of the actual text, no)


_TOKENS = ("chosen_tokens", "rejected_tokens")
_F = ("f_divergence", "f_alpha")  # the losses that take f-DPO's scores (TRL 1.16's list, plus sft, unaffected)
LOSSES: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid, True, options=("label_smoothing", *_F)),
    "hinge": LossSpec(hinge, True, options=_F),
    "ipo": LossSpec(ipo, True, _TOKENS, _F),
    "robust": LossSpec(robust, True, options=("label_smoothing", *_F)),
    "exo_pair": LossSpec(exo_pair, True, options=("label_smoothing", *_F)),
    "nca_pair": LossSpec(nca_pair, True),
    "bco_pair": LossSpec(bco_pair, True, options=("bco_delta",)),
    "sppo_hard": LossSpec(sppo_hard, True),
    "aot": LossSpec(aot, True, options=("label_smoothing",)),
    "aot_unpaired": LossSpec(aot_unpaired, True, options=("label_smoothing",)),
    "apo_zero": LossSpec(apo_zero, True),
    "apo_down": LossSpec(apo_down, True),
    "discopop": LossSpec(discopop, True, options=("discopop_tau", *_F)),
    "sigmoid_norm": LossSpec(sigmoid_norm, True, _TOKENS, _F),
    "sft": LossSpec(sft, False, ("chosen_tokens",), uses_ld=False),
    "orpo": LossSpec(orpo, False, _TOKENS),
    "simpo": LossSpec(simpo, False, _TOKENS, ("simpo_gamma", "label_smoothing")),
}
_OPTIONS = {"beta", "ld_alpha", "use_weighting"} | {option for spec in LOSSES.values() for option in spec.options}
_SORTING = ("aot", "aot_unpaired")  # losses[i] is a batch quantile, not pair i: a per-pair weight cannot apply


def check_loss_options(names: Sequence[str], *, f_divergence: str = "reverse_kl", use_weighting: bool = False,
                       label_smoothing: float = 0.0) -> None:
    """Refuse option combinations TRL 1.16 refuses (before any model is loaded)."""
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}")
    if f_divergence != "reverse_kl" and (bad := [n for n in names if n != "sft" and "f_divergence" not in LOSSES[n].options]):
        ok = [n for n, s in LOSSES.items() if "f_divergence" in s.options] + ["sft"]
        raise ValueError(f"f_divergence {f_divergence!r} is defined for the losses {', '.join(ok)}, not {', '.join(bad)}")
    if use_weighting and (bad := [n for n in names if n in _SORTING]):
        raise ValueError(f"use_weighting (WPO) cannot weight {', '.join(bad)}: those losses sort the batch, so "
                         "losses[i] is not pair i")
    if "exo_pair" in names and not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {label_smoothing}")


class LossInputs(NamedTuple):
    """Everything a loss may read, per example [B]: summed log-probs (nats), token counts (float)."""

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor | None = None  # None for reference-free losses
    ref_rejected_logps: Tensor | None = None
    chosen_tokens: Tensor | None = None  # completion token counts
    rejected_tokens: Tensor | None = None
    policy_chosen_logps_prefix: Tensor | None = None  # LD-DPO prefixes (see ld_logps)
    policy_rejected_logps_prefix: Tensor | None = None
    ref_chosen_logps_prefix: Tensor | None = None
    ref_rejected_logps_prefix: Tensor | None = None
    policy_chosen_wpo: Tensor | None = None  # WPO: mean aligned per-token log-probs (see wpo_weights)
    policy_rejected_wpo: Tensor | None = None


class CombinedLoss(NamedTuple):
    loss: Tensor  # scalar: losses.mean()
    losses: Tensor  # [B]: Σ_k weight_k * losses_k
    chosen_rewards: Tensor  # [B], detached
    rejected_rewards: Tensor  # [B], detached
    components: dict[str, Tensor]  # name -> unweighted mean of that loss (scalar)


def _apply_ld(inputs: LossInputs, alpha: float) -> LossInputs:
    updates = {}
    for field in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        value, prefix = getattr(inputs, field), getattr(inputs, field + "_prefix")
        if value is None:
            continue
        if prefix is None:
            raise ValueError(f"ld_alpha needs inputs.{field}_prefix")
        updates[field] = ld_logps(value, prefix, alpha)
    return inputs._replace(**updates)


def combined_loss(
    names: str | Sequence[str], weights: Sequence[float] | None, inputs: LossInputs, **options
) -> CombinedLoss:
    """Weighted sum of named losses (TRL's ``loss_type=[...]`` with ``loss_weights``, e.g. MPO).

    losses = Σ_k weights[k] * LOSSES[names[k]](...).losses; loss = losses.mean(). weights=None means
    1.0 each. options: beta (default 0.1), ld_alpha (LD-DPO, applied to every loss but sft; needs the
    prefixes), use_weighting (WPO: each loss's per-pair values times :func:`wpo_weights`; needs
    ``inputs.policy_*_wpo``), and the per-loss options (label_smoothing, bco_delta, discopop_tau,
    simpo_gamma, f_divergence, f_alpha), each passed only to the losses that take it. Rewards come from
    the first loss other than sft: β (π - ref) for reference-based losses, on the LD-weighted log-probs
    under ld_alpha (what TRL logs); sft alone gives β (π - ref) too when ref is given.
    """
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in LOSSES]
    if unknown or not names:
        raise ValueError(f"unknown loss name(s) {unknown}; valid names: {', '.join(LOSSES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss names repeat: {names}")
    weights = [1.0] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"{len(names)} loss names but {len(weights)} weights")
    bad = sorted(set(options) - _OPTIONS)
    if bad:
        raise ValueError(f"unknown loss option(s) {bad}; valid options: {', '.join(sorted(_OPTIONS))}")
    check_loss_options(names, f_divergence=options.get("f_divergence", "reverse_kl"),
                       use_weighting=bool(options.get("use_weighting")),
                       label_smoothing=options.get("label_smoothing", 0.0))
    beta = options.get("beta", 0.1)
    ld_alpha = options.get("ld_alpha")
    ld_inputs = inputs if ld_alpha is None else _apply_ld(inputs, ld_alpha)
    weights_wpo = None
    if options.get("use_weighting"):
        if inputs.policy_chosen_wpo is None or inputs.policy_rejected_wpo is None:
            raise ValueError("use_weighting needs inputs.policy_chosen_wpo / policy_rejected_wpo "
                             "(scoring.pair_logps(..., wpo=True))")
        weights_wpo = wpo_weights(inputs.policy_chosen_wpo, inputs.policy_rejected_wpo)

    total, components, outputs = None, {}, []
    for name, weight in zip(names, weights, strict=True):
        spec = LOSSES[name]
        src = ld_inputs if spec.uses_ld else inputs
        if spec.needs_ref and (src.ref_chosen_logps is None or src.ref_rejected_logps is None):
            free = [n for n, s in LOSSES.items() if not s.needs_ref]
            raise ValueError(f"loss {name!r} needs reference log-probs; reference-free losses: {free}")
        extra = {field: getattr(src, field) for field in spec.inputs}
        missing = [field for field, value in extra.items() if value is None]
        if missing:
            raise ValueError(f"loss {name!r} needs inputs {missing}")
        extra.update({key: options[key] for key in spec.options if key in options})
        out = spec.fn(
            src.policy_chosen_logps,
            src.policy_rejected_logps,
            src.ref_chosen_logps,
            src.ref_rejected_logps,
            beta=beta,
            **extra,
        )
        if weights_wpo is not None:
            # sft's values are shares of one batch mean, which TRL weights as a whole: times the mean weight.
            out = out._replace(losses=out.losses * (weights_wpo.mean() if name == "sft" else weights_wpo))
        total = weight * out.losses if total is None else total + weight * out.losses
        components[name] = out.losses.mean()
        outputs.append((name, out))
    rewards = next((out for name, out in outputs if name != "sft"), None)
    if rewards is None:  # sft alone: TRL still logs β × the (LD-weighted) log-ratios when there is a reference
        src = ld_inputs if ld_inputs.ref_chosen_logps is not None else inputs
        rewards = sft(src.policy_chosen_logps, src.policy_rejected_logps, src.ref_chosen_logps,
                      src.ref_rejected_logps, beta=beta, chosen_tokens=src.chosen_tokens)
    return CombinedLoss(total.mean(), total, rewards.chosen_rewards, rewards.rejected_rewards, components)


class RunningMean:
    """bco_pair's reward shift δ: the mean of every implicit reward seen so far in training (both sides of
    every pair, over all ranks), as TRL's BCO keeps it. Checkpoints carry it (:meth:`state_dict`), so a
    resumed run continues with the same δ."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def update(self, total: float, count: int) -> float:
        """Add ``count`` rewards summing to ``total``; returns the new mean."""
        self.total, self.count = self.total + total, self.count + int(count)
        return self.value

    @property
    def value(self) -> float:
        return self.total / self.count if self.count else 0.0

    def state_dict(self) -> tuple[float, int]:
        """``(total, count)``: the ``bco`` entry of a checkpoint's trainer state."""
        return self.total, self.count

    def load_state_dict(self, state) -> None:
        self.total, self.count = float(state[0]), int(state[1])
