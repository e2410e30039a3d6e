"""The precompute pass: one run of the frozen reference model over a preference dataset.

Resumable and incremental by construction: the ids already in the cache are skipped, pending pairs are
scored shard by shard, and each shard lands atomically. Under ``torchrun`` / ``accelerate launch``
each rank scores the ids that hash to it and writes its own shards; rank 0 checks coverage at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .atomic import WriteError
from .cache import (
    SCHEMA_VERSION,
    CacheError,
    CacheWriter,
    differences,
    existing_ids,
    read_metadata,
    remove_temporaries,
    shard_paths,
    verify,
)
from .columns import RowMapping
from .config import PrecomputeConfig
from .distributed import barrier, dist_info, setup
from .locking import directory_lock
from .schemas import cache_schema


def owner_rank(example_id: str, world_size: int) -> int:
    """Which rank scores an id: a hash, so the split does not depend on row order."""
    return int(hashlib.sha1(example_id.encode()).hexdigest()[:8], 16) % world_size


def cache_metadata(config: PrecomputeConfig, source, tokenizer, quantize: str, dtype: str, world_size: int) -> dict:
    from .models import chat_template_hash, model_fingerprint, tokenizer_fingerprint

    return {
        "schema_version": SCHEMA_VERSION,
        "prefcache_version": __version__,
        "model_name": source.name,
        "model_path": str(source.path / source.gguf_file) if source.gguf_file else str(source.path),
        "model_fingerprint": model_fingerprint(source),
        "model_id": source.hub_id,  # a Hub id and the commit it resolved to; None for a local model
        "model_revision": source.revision,
        "adapter": config.adapter,
        "adapter_fingerprint": model_fingerprint_of_adapter(config.adapter),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "chat_template_hash": chat_template_hash(tokenizer),
        "max_length": config.max_length,
        "truncation": config.truncation,
        "quantization": quantize,
        "dtype": dtype,
        "per_token": config.per_token,
        "prefix_sharing": config.prefix_sharing,  # packed rows: each prompt computed once (prefcache.packing)
        "data_mapping": RowMapping.of(config).record(),  # columns and templates; None = the data's own
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "world_size": world_size,
        # Informational (not compared on extend): 4-bit values depend on the bitsandbytes build and kernel.
        "library_versions": library_versions(),
    }


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def model_fingerprint_of_adapter(adapter: str | None) -> str | None:
    if not adapter:
        return None
    from .hub import resolve_adapter
    from .models import file_fingerprint

    files = sorted(p for p in resolve_adapter(adapter).iterdir() if p.suffix in (".safetensors", ".bin"))
    return file_fingerprint(files)


def score_sequences(model, sequences: list[tuple[list[int], int]], *, batch_size: int, pad_id: int,
                    chunk_size: int, device: str, on_batch=None) -> list:
    """Score unique (token ids, completion start) sequences, longest first, in padded batches.

    Returns, per sequence, a numpy fp32 array of its completion tokens' log-probs (nats).
    ``on_batch(n_sequences, n_tokens)`` is called after each batch (progress reporting).
    """
    import torch

    from .data import collate
    from .logprobs import token_logprobs

    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # length buckets: little padding
    out: list = [None] * len(sequences)
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            input_ids, attention, completion = collate(
                [sequences[i][0] for i in idx], [sequences[i][1] for i in idx], pad_id
            )
            logps = token_logprobs(model, input_ids.to(device), attention.to(device), completion.to(device),
                                   chunk_size=chunk_size).cpu()
            for row, i in enumerate(idx):
                ids, start = sequences[i]
                out[i] = logps[row, start : len(ids)].numpy()
            if on_batch:
                on_batch(len(idx), int(attention.sum()))
    return out


def shard_columns(pairs, token_logps: dict, per_token: bool) -> dict[str, list]:
    """Cache columns for ``pairs`` from per-sequence token log-probs keyed by the full token tuple."""
    import numpy as np

    cols: dict[str, list] = {name: [] for name in cache_schema(per_token).names}
    for p in pairs:
        chosen = token_logps[tuple(p.prompt_ids + p.chosen_ids)]
        rejected = token_logps[tuple(p.prompt_ids + p.rejected_ids)]
        shared = min(len(chosen), len(rejected))  # LD-DPO's "public" length
        cols["id"].append(p.id)
        # Sum in float64: the per-token values are fp32, their sum need not lose more.
        cols["chosen_logps"].append(float(np.sum(chosen, dtype=np.float64)))
        cols["rejected_logps"].append(float(np.sum(rejected, dtype=np.float64)))
        cols["chosen_logps_prefix"].append(float(np.sum(chosen[:shared], dtype=np.float64)))
        cols["rejected_logps_prefix"].append(float(np.sum(rejected[:shared], dtype=np.float64)))
        cols["prompt_tokens"].append(len(p.prompt_ids))
        cols["chosen_tokens"].append(len(p.chosen_ids))
        cols["rejected_tokens"].append(len(p.rejected_ids))
        cols["chosen_truncated"].append(p.chosen_truncated)
        cols["rejected_truncated"].append(p.rejected_truncated)
        if per_token:
            cols["chosen_token_logps"].append(chosen.tolist())
            cols["rejected_token_logps"].append(rejected.tolist())
    return cols


def precompute(config: PrecomputeConfig | None = None, **options) -> dict:
    """Run the reference model over ``config.data`` and write (or extend) the cache ``config.out``.

    ``precompute(data="prefs.jsonl", out="cache/", quantize="4bit")`` is the same as the CLI.
    Returns a summary dict: pairs cached before and now, pairs scored, bad rows, seconds, pairs/s, tokens/s.
    """
    config = config or PrecomputeConfig(**options)
    if config.unpaired:  # KTO data: one completion per example plus its KL completion
        from .unpaired import precompute_unpaired

        with directory_lock(config.out, "prefcache precompute", rank=dist_info()[0]):
            return precompute_unpaired(config, kl_group_size=config.kl_group_size)
    # One writer per cache (per rank under torchrun): a second pass is refused, naming the holder.
    with directory_lock(config.out, "prefcache precompute", rank=dist_info()[0]):
        return _precompute(config)


def _precompute(config: PrecomputeConfig) -> dict:
    import pyarrow as pa
    from tqdm.auto import tqdm

    from .data import BLOCK_ROWS, DataFormatError, iter_pair_blocks, write_bad_rows
    from .models import (
        compute_dtype,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_model,
        resolve_quantization,
    )

    rank, world, device = setup(resolve_device(config.device))
    t0 = time.perf_counter()
    source = resolve_model(config.model, config.revision)
    quantize = resolve_quantization(config.quantize, device)
    tokenizer = load_tokenizer(source)
    meta = cache_metadata(config, source, tokenizer, quantize, str(compute_dtype(quantize, device)).replace("torch.", ""), world)

    out = Path(config.out)
    remove_temporaries(out, rank)  # of a killed pass, even when nothing is left to score
    if out.exists() and shard_paths(out):
        have = read_metadata(out)
        if diff := differences(have, meta):
            raise CacheError(f"{out} holds a cache made with other settings; refusing to extend it:\n  "
                             + "\n  ".join(diff) + "\nUse a new --out directory, or the original settings.")
        # An extension keeps the path the cache was made with (the values agree to float rounding either way).
        meta["prefix_sharing"] = bool(have.get("prefix_sharing", False))

    done = existing_ids(out) if out.exists() else set()
    before = len(done)
    data_ids: list = []  # every scorable id of the data, as Arrow arrays (off the Python heap): the final check
    bad_rows: list = []

    def pending_shards():
        """Shards still to score, read block by block: the data is never held whole (bounded memory)."""
        block_rows = config.shard_size * max(1, BLOCK_ROWS // config.shard_size)
        for block, bad in iter_pair_blocks(config.data, tokenizer, config.max_length, config.truncation,
                                           config.on_bad_row, split=config.split, data_config=config.data_config,
                                           mapping=RowMapping.of(config), block_rows=block_rows):
            bad_rows.extend(bad)
            data_ids.append(pa.array([p.id for p in block], pa.string()))
            pending = [p for p in block if p.id not in done and owner_rank(p.id, world) == rank]
            # Longest pairs first: batches of similar length, and an out-of-memory shows up at once.
            pending.sort(key=lambda p: -(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))))
            for s in range(0, len(pending), config.shard_size):
                yield pending[s : s + config.shard_size]

    shards = pending_shards()
    first = next(shards, None)  # nothing pending: the model is never loaded
    if first is None and not data_ids:  # the whole data was read: not one scorable pair in it
        if not bad_rows:
            raise DataFormatError(f"{config.data} holds no preference rows: nothing to cache")
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            write_bad_rows(out / "bad_rows.jsonl", bad_rows)
        raise DataFormatError(f"all {len(bad_rows)} rows of {config.data} are bad rows (listed in "
                              f"{out / 'bad_rows.jsonl'}): nothing to cache")
    scored_pairs = scored_tokens = 0
    if first is not None:
        model, _ = load_model(source, quantize=quantize, device=device, adapter=config.adapter)
        from .packing import resolve_sharing, score_shared

        sharing = meta["prefix_sharing"] = resolve_sharing(model, meta["prefix_sharing"])
        writer = CacheWriter(out, meta, rank=rank)
        if rank == 0:
            writer.write_manifest()
        bar = tqdm(unit="pair", desc=f"precompute{f' rank {rank}' if world > 1 else ''}",
                   disable=not config.progress, dynamic_ncols=True)
        t_start = time.perf_counter()
        for shard in itertools.chain([first], shards):
            s = scored_pairs  # where the bar stands when this shard starts
            unique: dict[tuple, int] = {}  # an identical (prompt, completion) sequence is scored once
            for p in shard:
                for completion in (p.chosen_ids, p.rejected_ids):
                    unique.setdefault(tuple(p.prompt_ids + completion), len(p.prompt_ids))
            keys = list(unique)
            seqs_done, n_keys, n_pairs = 0, len(keys), len(shard)

            def progress(n_seqs, n_tokens, start=s, n_keys=n_keys, n_pairs=n_pairs):
                # The bar moves per batch (pairs in proportion to the shard's sequences scored), so its
                # pairs/s is live; tokens/s counts the real (unpadded) tokens scored.
                nonlocal scored_tokens, seqs_done
                scored_tokens, seqs_done = scored_tokens + n_tokens, seqs_done + n_seqs
                elapsed = max(time.perf_counter() - t_start, 1e-9)
                bar.set_postfix_str(f"{scored_tokens / elapsed:,.0f} tok/s", refresh=False)
                bar.update(start + int(seqs_done / n_keys * n_pairs) - bar.n)

            sequences = [(list(k), unique[k]) for k in keys]
            if sharing:  # a prompt once per packed row, for all of its unique completions in the shard
                logps = score_shared(model, sequences, batch_size=config.batch_size, pad_id=tokenizer.pad_token_id,
                                     chunk_size=config.chunk_size, device=device, max_row=2 * config.max_length,
                                     on_batch=progress)
            else:
                logps = score_sequences(model, sequences, batch_size=2 * config.batch_size,
                                        pad_id=tokenizer.pad_token_id, chunk_size=config.chunk_size, device=device,
                                        on_batch=progress)
            try:
                writer.write(shard_columns(shard, dict(zip(keys, logps, strict=True)), config.per_token))
            except WriteError as e:  # disk full, file-size limit, read-only: the shards written stay whole
                raise WriteError(e.errno, f"{e}; the {scored_pairs} pairs of this pass already in {out} are kept: "
                                          "free space and rerun the same command to finish the cache") from e
            scored_pairs += len(shard)
            bar.update(s + len(shard) - bar.n)
        bar.close()
        del model
    if bad_rows and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_bad_rows(out / "bad_rows.jsonl", bad_rows)

    problems: list[str] = []
    barrier(world)
    if rank == 0:
        problems = verify(out, expected_ids=itertools.chain.from_iterable(a.to_pylist() for a in data_ids))
        if out.exists():
            from .runconfig import write_config

            write_config(config, out / "config.yaml")  # `prefcache precompute --config CACHE/config.yaml`
    elapsed = time.perf_counter() - t0
    return {
        "cache": str(out), "rank": rank, "world_size": world, "pairs_in_data": sum(len(a) for a in data_ids),
        "cached_before": before, "scored": scored_pairs, "bad_rows": len(bad_rows), "seconds": elapsed,
        "pairs_per_s": scored_pairs / elapsed if elapsed else 0.0,
        "tokens_per_s": scored_tokens / elapsed if elapsed else 0.0,
        "problems": problems, "config": asdict(config),
    }


def verify_cache(cache_dir: str, data: str | None = None, *, split: str | None = None,
                 data_config: str | None = None) -> dict:
    """Check a cache's shards (integrity, consistent metadata, duplicates, NaN/inf) and, given the
    data it was made from, that every scorable id of the data is present exactly once.

    The data is tokenised as the cache says (its tokenizer, max_length, truncation), so rows the
    precompute pass had to skip (bad rows) are not counted as missing.
    """
    from .cache import summary
    from .data import load_dataset_pairs
    from .models import load_tokenizer, resolve_model, tokenizer_fingerprint

    try:
        meta = read_metadata(cache_dir)
    except CacheError as e:
        if not shard_paths(cache_dir):
            raise
        bad = verify(cache_dir)  # a damaged first shard: report every shard by name, as for the others
        return {"summary": f"{cache_dir}: NOT OK", "problems": bad or [str(e)]}
    expected = None
    problems: list[str] = []
    if data is not None:
        tokenizer = load_tokenizer(resolve_model(meta.get("model_path")))
        if tokenizer_fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
            problems.append(f"the tokenizer at {meta.get('model_path')} is not the one that made this cache")
        if meta.get("kind") == "unpaired":  # a KTO cache: one row per (unpaired) example
            from .unpaired import load_unpaired

            pairs, _, _ = load_unpaired(data, tokenizer, meta["max_length"], meta["truncation"], "skip", unpair=True)
        else:
            mapping = RowMapping(**(meta.get("data_mapping") or {}))  # the columns/templates it was made with
            pairs, _, _ = load_dataset_pairs(data, tokenizer, meta["max_length"], meta["truncation"], "skip",
                                             mapping=mapping, split=split, data_config=data_config)
        expected = [p.id for p in pairs]
    problems += verify(cache_dir, expected_ids=expected)
    if problems:
        return {"summary": f"{cache_dir}: NOT OK", "problems": problems}
    info = summary(cache_dir)
    covered = f", covers all {len(set(expected))} ids of {data}" if expected is not None else ""
    return {"summary": f"{cache_dir}: OK ({info['shards']} shards, {info['rows']} rows, no NaN/inf, "
                       f"no duplicate ids{covered})", "problems": []}
