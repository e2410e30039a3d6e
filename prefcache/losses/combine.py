"""The objective a step optimises: named losses from the registry, weighted and summed (TRL's
``loss_type=[...]`` with ``loss_weights``), with LD-DPO's length weighting and WPO's pair weights applied,
and bco_pair's running reward mean carried across steps.

A run binds its :class:`Objective` once, from its options (names, weights and options checked then), and
calls it per micro-batch; :func:`combined_loss` binds and calls in one go, for tests and one-off use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from torch import Tensor

from prefcache.losses import pairs as pair_losses
from prefcache.losses.pairs import LossOutput, sft
from prefcache.losses.registry import PAIR_LOSSES, PAIR_OPTIONS, check_loss_options
from prefcache.losses.transforms import ld_logps, wpo_weights


class LossSpec(NamedTuple):
    """A pair loss: its function and what :mod:`prefcache.losses.registry` declares about it."""

    fn: Callable[..., LossOutput]
    needs_ref: bool
    inputs: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    uses_ld: bool = True


LOSSES: dict[str, LossSpec] = {name: LossSpec(getattr(pair_losses, name), info.needs_ref, info.inputs, info.options,
                                              info.uses_ld) for name, info in PAIR_LOSSES.items()}
_OPTIONS = PAIR_OPTIONS


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
    for name in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        value, prefix = getattr(inputs, name), getattr(inputs, name + "_prefix")
        if value is None:
            continue
        if prefix is None:
            raise ValueError(f"ld_alpha needs inputs.{name}_prefix")
        updates[name] = ld_logps(value, prefix, alpha)
    return inputs._replace(**updates)


@dataclass(frozen=True)
class Objective:
    """A step's objective, its names, weights and options checked once (:meth:`bind`), then called per
    micro-batch. Only ``bco_delta`` (bco_pair's running reward mean) changes from call to call."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    options: dict = field(default_factory=dict)

    @classmethod
    def bind(cls, names: str | Sequence[str], weights: Sequence[float] | None = None, **options) -> Objective:
        """Check ``names`` (known, each once), ``weights`` (one per name, None = 1.0 each) and ``options``
        (known, in combinations TRL accepts); see :func:`combined_loss` for their meaning."""
        names = (names,) if isinstance(names, str) else tuple(names)
        unknown = [name for name in names if name not in LOSSES]
        if unknown or not names:
            raise ValueError(f"unknown loss name(s) {unknown}; valid names: {', '.join(LOSSES)}")
        if len(set(names)) != len(names):
            raise ValueError(f"loss names repeat: {list(names)}")
        weights = (1.0,) * len(names) if weights is None else tuple(float(w) for w in weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} loss names but {len(weights)} weights")
        if bad := sorted(set(options) - _OPTIONS):
            raise ValueError(f"unknown loss option(s) {bad}; valid options: {', '.join(sorted(_OPTIONS))}")
        check_loss_options(names, f_divergence=options.get("f_divergence", "reverse_kl"),
                           use_weighting=bool(options.get("use_weighting")),
                           label_smoothing=options.get("label_smoothing", 0.0))
        return cls(names, weights, dict(options))

    def __call__(self, inputs: LossInputs, **changing) -> CombinedLoss:
        """The combined loss of one micro-batch; ``changing``: ``bco_delta`` only."""
        if bad := sorted(set(changing) - {"bco_delta"}):
            raise ValueError(f"only bco_delta changes per call, got {bad}")
        options = {**self.options, **changing}
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
        for name, weight in zip(self.names, self.weights, strict=True):
            out = _one_loss(name, ld_inputs if LOSSES[name].uses_ld else inputs, beta, options)
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


def _one_loss(name: str, src: LossInputs, beta: float, options: dict) -> LossOutput:
    spec = LOSSES[name]
    if spec.needs_ref and (src.ref_chosen_logps is None or src.ref_rejected_logps is None):
        free = [n for n, s in LOSSES.items() if not s.needs_ref]
        raise ValueError(f"loss {name!r} needs reference log-probs; reference-free losses: {free}")
    extra = {f: getattr(src, f) for f in spec.inputs}
    if missing := [f for f, value in extra.items() if value is None]:
        raise ValueError(f"loss {name!r} needs inputs {missing}")
    extra.update({key: options[key] for key in spec.options if key in options})
    return spec.fn(src.policy_chosen_logps, src.policy_rejected_logps, src.ref_chosen_logps, src.ref_rejected_logps,
                   beta=beta, **extra)


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

    One call binds and checks everything again; a training run binds an :class:`Objective` once instead.
    """
    return Objective.bind(names, weights, **options)(inputs)


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
