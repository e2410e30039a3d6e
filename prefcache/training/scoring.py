"""Policy log-probs of tokenised pairs, cached reference values joined by id, implicit rewards.

One code path for the trainer (its steps and its eval split) and for ``prefcache score``: the numbers
a run logs for held-out pairs and the numbers ``score`` reports for a checkpoint come from here.
"""

from __future__ import annotations

import torch

from prefcache.cache.compat import cache_sharing
from prefcache.cache.lookup import ReferenceTable
from prefcache.core.schemas import EXAMPLE_COLUMNS, example_columns
from prefcache.model.kernel import DEFAULT_CHUNK
from prefcache.model.pairs import pair_logps
from prefcache.training.vision import batch_vision


def score_pairs(model, pairs, reference: ReferenceTable, *, beta: float, batch_size: int, pad_id: int,
                device="cpu", chunk_size: int = DEFAULT_CHUNK, prefix_sharing: bool | None = None,
                processor=None) -> tuple[dict[str, list], dict[str, float]]:
    """Implicit rewards of ``pairs`` under ``model`` against the cached reference.

    ``prefix_sharing``: score pairs as packed rows (None: as the cache was made, see :func:`cache_sharing`).
    ``processor``: a vision-language model's; each batch's image tensors come from it (:func:`batch_vision`).

    reward = beta * (policy_logps - ref_logps) per side (summed log-probs, nats);
    margin = reward_chosen - reward_rejected; accuracy = share of pairs with margin > 0 (ties count as wrong).
    Returns (per-example columns in the run's ``examples`` schema, without step/split/checkpoint;
    aggregate means: rewards_chosen, rewards_rejected, rewards_margins, rewards_accuracies,
    logps_chosen, logps_rejected, n).
    """
    cols: dict[str, list] = {k: [] for k in EXAMPLE_COLUMNS}
    if prefix_sharing is None:
        prefix_sharing = cache_sharing(reference.metadata)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for s in range(0, len(pairs), batch_size):
            batch = list(pairs[s : s + batch_size])  # a data store's view: the batch's pairs built once
            ids = [p.id for p in batch]
            ref = reference.lookup(ids)
            pol = pair_logps(model, batch, pad_id=pad_id, device=device, chunk_size=chunk_size,
                             prefix_sharing=prefix_sharing, vision=batch_vision(batch, processor))
            pc, pr = pol.chosen.double().cpu(), pol.rejected.double().cpu()
            rc, rr = beta * (pc - ref["chosen_logps"]), beta * (pr - ref["rejected_logps"])
            for k, v in example_columns(batch, pc, pr, ref["chosen_logps"], ref["rejected_logps"], rc, rr).items():
                cols[k] += v
    model.train(was_training)
    return cols, aggregate(cols)


def aggregate(cols: dict[str, list]) -> dict[str, float]:
    """Means over pairs, named like the trainer's step metrics."""
    n = len(cols["id"])
    if n == 0:
        return {"n": 0}
    mean = lambda xs: float(sum(xs) / n)  # noqa: E731
    return {
        "rewards_chosen": mean(cols["reward_chosen"]),
        "rewards_rejected": mean(cols["reward_rejected"]),
        "rewards_margins": mean(cols["margin"]),
        "rewards_accuracies": mean([float(m > 0) for m in cols["margin"]]),
        "logps_chosen": mean(cols["policy_chosen_logps"]),
        "logps_rejected": mean(cols["policy_rejected_logps"]),
        "n": n,
    }


