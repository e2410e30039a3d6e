"""Every loss prefcache knows, by name, declared once and without torch.

The CLI's ``--help``, the option checks of ``TrainConfig`` and the refusals run before torch loads, so
they read this table; :mod:`prefcache.losses.combine` (pairs) and :mod:`prefcache.losses.unpaired`
(unpaired examples) hold the functions, each named after its loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # f-DPO (losses.pairs.f_scores)


class LossInfo(NamedTuple):
    needs_ref: bool
    inputs: tuple[str, ...] = ()  # LossInputs fields passed as keywords (token counts)
    options: tuple[str, ...] = ()  # keyword options besides beta
    uses_ld: bool = True  # ld_alpha transforms its log-probs (sft: an NLL of the actual text, no)
    kl: bool = False  # unpaired: takes KTO's batch KL estimate z


_TOKENS = ("chosen_tokens", "rejected_tokens")
_F = ("f_divergence", "f_alpha")  # the losses that take f-DPO's scores (TRL 1.16's list, plus sft, unaffected)
PAIR_LOSSES: dict[str, LossInfo] = {
    "sigmoid": LossInfo(True, options=("label_smoothing", *_F)),
    "hinge": LossInfo(True, options=_F),
    "ipo": LossInfo(True, _TOKENS, _F),
    "robust": LossInfo(True, options=("label_smoothing", *_F)),
    "exo_pair": LossInfo(True, options=("label_smoothing", *_F)),
    "nca_pair": LossInfo(True),
    "bco_pair": LossInfo(True, options=("bco_delta",)),
    "sppo_hard": LossInfo(True),
    "aot": LossInfo(True, options=("label_smoothing",)),
    "aot_unpaired": LossInfo(True, options=("label_smoothing",)),
    "apo_zero": LossInfo(True),
    "apo_down": LossInfo(True),
    "discopop": LossInfo(True, options=("discopop_tau", *_F)),
    "sigmoid_norm": LossInfo(True, _TOKENS, _F),
    "sft": LossInfo(False, ("chosen_tokens",), uses_ld=False),
    "orpo": LossInfo(False, _TOKENS),
    "simpo": LossInfo(False, _TOKENS, ("simpo_gamma", "label_smoothing")),
}
# Losses on unpaired examples (TRL's KTO format), each used alone, always against a reference cache.
UNPAIRED_LOSSES: dict[str, LossInfo] = {
    "kto": LossInfo(True, options=("desirable_weight", "undesirable_weight"), kl=True),
    "apo_zero_unpaired": LossInfo(True, options=("desirable_weight", "undesirable_weight")),
}
PAIR_OPTIONS = {"beta", "ld_alpha", "use_weighting"} | {option for spec in PAIR_LOSSES.values() for option in spec.options}
_SORTING = ("aot", "aot_unpaired")  # losses[i] is a batch quantile, not pair i: a per-pair weight cannot apply
LOSSES: dict[str, LossInfo] = {**PAIR_LOSSES, **UNPAIRED_LOSSES}
# Options every loss of one kind reads, none of the other: given to the other kind they would do nothing.
_KIND_OPTIONS = {"pairs": ("ld_alpha", "label_smoothing", "simpo_gamma", "discopop_tau"),
                 "unpaired": ("desirable_weight", "undesirable_weight")}


def check_loss_names(names: Sequence[str]) -> None:
    """Known names, each once, and an unpaired loss alone (the one place loss names are checked)."""
    if unknown := [n for n in names if n not in LOSSES]:
        raise ValueError(f"unknown loss {', '.join(unknown)}; choose from {', '.join(LOSSES)}")
    if set(names) & set(UNPAIRED_LOSSES) and len(names) > 1:
        raise ValueError(f"{', '.join(UNPAIRED_LOSSES)} train on unpaired data and cannot be combined: {list(names)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"loss must name each loss once, got {list(names)}")


def check_loss_options(names: Sequence[str], *, f_divergence: str = "reverse_kl", use_weighting: bool = False,
                       label_smoothing: float = 0.0, given: Sequence[str] = ()) -> None:
    """Refuse options the chosen losses cannot combine with, the same way for pairs and unpaired examples
    (before any model is loaded). ``given``: the options set away from their defaults, refused when no
    chosen loss reads them (an option that does nothing is refused, not ignored)."""
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {f_divergence!r}")
    if f_divergence != "reverse_kl" and (bad := [n for n in names if n != "sft" and "f_divergence" not in LOSSES[n].options]):
        ok = [n for n, s in PAIR_LOSSES.items() if "f_divergence" in s.options] + ["sft"]
        raise ValueError(f"f_divergence {f_divergence!r} is defined for the losses {', '.join(ok)}, not {', '.join(bad)}")
    if "f_alpha" in given and f_divergence != "alpha_divergence":
        raise ValueError(f"f_alpha is the α of f_divergence alpha_divergence; with {f_divergence!r} it does nothing: "
                         "drop it, or pass f_divergence alpha_divergence (--f-divergence alpha_divergence)")
    if use_weighting and (bad := [n for n in names if n in _SORTING]):
        raise ValueError(f"use_weighting (WPO) cannot weight {', '.join(bad)}: those losses sort the batch, so "
                         "losses[i] is not pair i")
    if use_weighting and (bad := [n for n in names if n in UNPAIRED_LOSSES]):
        raise ValueError(f"use_weighting (WPO) cannot weight {', '.join(bad)}: it weights pairs, and those losses "
                         "train on unpaired examples")
    kind, other = ("unpaired", "pairs") if set(names) & set(UNPAIRED_LOSSES) else ("pairs", "unpaired")
    if unused := [o for o in _KIND_OPTIONS[other] if o in given]:
        raise ValueError(f"{', '.join(unused)}: option(s) of the losses on {other}, which loss {', '.join(names)} "
                         f"(on {kind}) does not read; drop them")
    if "exo_pair" in names and not 0 < label_smoothing < 1:
        raise ValueError(f"exo_pair needs label_smoothing in (0, 1) (the EXO paper uses 1e-3), got {label_smoothing}")
