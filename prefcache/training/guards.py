"""Checks that keep NaN out of trained weights and a mismatched reference out of the rewards.

A single NaN reference value, a duplicated shard, or a policy loaded at another precision than the
reference that made the cache all train "successfully" without these: NaN adapters with exit 0, or
rewards that do not start at zero. Each check names what it found (ids, step, file) in one line.
"""

from __future__ import annotations

import math

from prefcache.model.policy import base_precision

# A policy equal to the cache's reference has margin 0 at step 0 (to ~1e-5 in fp32); beyond this the
# step-0 policy is not the reference and the implicit rewards start off zero.
STEP0_MARGIN_TOLERANCE = 1e-3


class NonFiniteError(ValueError):
    """Training produced a NaN/inf loss or gradient; the run stops before the optimizer applies it."""


def resolve_finetune(requested: str, cache_meta: dict | None, device: str = "cpu") -> tuple[str, str | None]:
    """``auto`` -> the policy that made the cache (qlora on a 4-bit cache, else lora), and a warning
    when the user's choice loads the base at another precision than the reference that made the cache."""
    quantization = (cache_meta or {}).get("quantization")
    made_by = "qlora" if quantization == "4bit" else "lora"
    if requested == "auto":
        return made_by, None
    precision = base_precision(requested, device)
    if cache_meta is None or precision == quantization:
        return requested, None
    return requested, (f"--finetune {requested} loads the policy's base in {precision}, but the cache was made "
                       f"in {quantization}: the step-0 rewards will not be 0 nor the loss ln 2 "
                       f"(--finetune auto = {made_by} starts the policy as the cache's reference)")


def check_step(step: int, ids: list[str], losses, grad_norm: float | None = None, unit: str = "pair") -> None:
    """Stop at the first non-finite per-example loss ([B] tensor) or gradient norm, naming the step and the
    examples (``unit``: what an example is called, pair or example)."""
    import torch

    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        which = [ids[i] for i in range(len(ids)) if not bool(finite[i])]
        raise NonFiniteError(f"step {step}: non-finite loss on {unit}(s) {', '.join(which[:5])}; stopped before "
                             "the update, the last checkpoint is the last good one")
    if grad_norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"step {step}: non-finite gradient (norm {grad_norm}) from {unit}s "
                             f"{', '.join(ids[:5])}{' ...' if len(ids) > 5 else ''}; stopped before the update, "
                             "the last checkpoint is the last good one")
