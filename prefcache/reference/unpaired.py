"""prefcache.reference.unpaired."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from prefcache.cache.store import (
    CacheError,
    CacheWriter,
    differences,
    existing_ids,
    read_metadata,
    shard_paths,
    verify,
)
from prefcache.core.distributed import barrier, setup
from prefcache.core.schemas import UNPAIRED_CACHE
from prefcache.data.pairs import (
    write_bad_rows,
)
from prefcache.data.unpaired import (
    DEFAULT_KL_GROUP,
    TokenizedCompletion,
    check_no_mapping,
    kl_partners,
    kl_sequence,
    load_unpaired,
)
from prefcache.model.load import (
    compute_dtype,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model,
    resolve_quantization,
)
from prefcache.reference.shards import cache_metadata, owner_rank, score_sequences


# ---- the cache ----
def cache_columns(items: list[TokenizedCompletion], by_id: dict, partners: dict[str, str], token_logps: dict,
                  max_length: int, truncation: str) -> dict[str, list]:
    """Shard columns from per-sequence token log-probs keyed by the full token tuple."""
    import numpy as np

    cols = {c: [] for c in ("id", "label", "logps", "kl_id", "kl_logps", "prompt_tokens", "completion_tokens",
                            "kl_tokens", "truncated")}
    for item in items:
        kp, kc = kl_sequence(item, by_id[partners[item.id]], max_length, truncation)
        own = token_logps[tuple(item.prompt_ids + item.completion_ids)]
        kl = token_logps[tuple(kp + kc)]
        cols["id"].append(item.id)
        cols["label"].append(item.label)
        cols["logps"].append(float(np.sum(own, dtype=np.float64)))
        cols["kl_id"].append(partners[item.id])
        cols["kl_logps"].append(float(np.sum(kl, dtype=np.float64)))
        cols["prompt_tokens"].append(len(item.prompt_ids))
        cols["completion_tokens"].append(len(item.completion_ids))
        cols["kl_tokens"].append(len(kc))
        cols["truncated"].append(item.truncated)
    return cols


def precompute_unpaired(config, *, kl_group_size: int = DEFAULT_KL_GROUP, unpair: bool = True) -> dict:
    """``prefcache precompute --unpaired``: reference log-probs of each completion and of its KL completion.

    ``config`` is a :class:`~prefcache.reference.config.PrecomputeConfig` (per_token is not supported here). Paired data
    is unpaired (``unpair``). Resumable like the pair cache (ids already cached are skipped); under torchrun each
    rank scores the ids that hash to it (every rank reads all the data: KL partners may belong to another rank).
    """
    if config.per_token:
        raise ValueError("--per-token is not supported for unpaired caches")
    check_no_mapping(config)
    rank, world, device = setup(resolve_device(config.device))
    t0 = time.perf_counter()
    source = resolve_model(config.model)
    quantize = resolve_quantization(config.quantize, device)
    tokenizer = load_tokenizer(source)
    meta = cache_metadata(config, source, tokenizer, quantize, str(compute_dtype(quantize, device)).replace("torch.", ""),
                          world)
    meta.update(kind="unpaired", kl_group_size=kl_group_size, prefix_sharing=False)  # one sequence per completion
    out = Path(config.out)
    if out.exists() and shard_paths(out) and (diff := differences(read_metadata(out), meta)):
        raise CacheError(f"{out} holds a cache made with other settings; refusing to extend it:\n  " + "\n  ".join(diff))

    items, bad_rows, _ = load_unpaired(config.data, tokenizer, config.max_length, config.truncation,
                                       config.on_bad_row, unpair=unpair, split=config.split,
                                       data_config=config.data_config)
    if bad_rows and rank == 0:
        write_bad_rows(out / "bad_rows.jsonl", bad_rows)
    by_id = {i.id: i for i in items}
    partners = kl_partners([i.id for i in items], kl_group_size)
    done = existing_ids(out) if out.exists() else set()
    pending = [i for i in items if i.id not in done and owner_rank(i.id, world) == rank]
    tokens = 0

    def count(_, n_tokens):
        nonlocal tokens
        tokens += n_tokens

    if pending:
        model, _ = load_model(source, quantize=quantize, device=device, adapter=config.adapter)
        writer = CacheWriter(out, meta, rank=rank, table_schema=UNPAIRED_CACHE)
        if rank == 0:
            writer.write_manifest()
        bar = tqdm(total=len(pending), unit="example", desc=f"precompute{f' rank {rank}' if world > 1 else ''}",
                   disable=not config.progress, dynamic_ncols=True)
        for s in range(0, len(pending), config.shard_size):
            shard = pending[s : s + config.shard_size]
            unique: dict[tuple, int] = {}
            for item in shard:
                unique.setdefault(tuple(item.prompt_ids + item.completion_ids), len(item.prompt_ids))
                kp, kc = kl_sequence(item, by_id[partners[item.id]], config.max_length, config.truncation)
                unique.setdefault(tuple(kp + kc), len(kp))
            keys = list(unique)
            logps = score_sequences(model, [(list(k), unique[k]) for k in keys], batch_size=2 * config.batch_size,
                                    pad_id=tokenizer.pad_token_id, chunk_size=config.chunk_size, device=device,
                                    on_batch=count)
            writer.write(cache_columns(shard, by_id, partners, dict(zip(keys, logps, strict=True)),
                                       config.max_length, config.truncation))
            bar.update(len(shard))
        bar.close()
        del model
    barrier(world)
    problems = verify(out, expected_ids=[i.id for i in items]) if rank == 0 else []
    elapsed = time.perf_counter() - t0
    return {"cache": str(out), "rank": rank, "world_size": world, "examples_in_data": len(items),
            "cached_before": len(done),
            "scored": len(pending), "bad_rows": len(bad_rows), "seconds": elapsed, "problems": problems,
            "pairs_per_s": len(pending) / elapsed, "tokens_per_s": tokens / elapsed, "config": asdict(config),
            "kl_group_size": kl_group_size}
