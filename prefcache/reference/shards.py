"""The precompute pass: one run of the frozen reference model over a preference dataset.

Resumable and incremental by construction: the ids already in the cache are skipped, pending pairs are
scored shard by shard, and each shard lands atomically. Under ``torchrun`` / ``accelerate launch``
each rank scores the ids that hash to it and writes its own shards; rank 0 checks coverage at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from prefcache import __version__
from prefcache.cache.store import (
    SCHEMA_VERSION,
    CacheError,
    CacheWriter,
    differences,
    existing_ids,
    read_metadata,
    remove_temporaries,
    shard_paths,
    summary,
    verify,
)
from prefcache.core.atomic import WriteError
from prefcache.core.distributed import barrier, dist_info, setup
from prefcache.core.hub import resolve_adapter
from prefcache.core.locking import directory_lock
from prefcache.core.runconfig import write_config
from prefcache.core.schemas import cache_schema
from prefcache.data.columns import RowMapping
from prefcache.data.pairs import (
    BLOCK_ROWS,
    DataFormatError,
    iter_pair_blocks,
    load_dataset_pairs,
    write_bad_rows,
)
from prefcache.model.load import (
    chat_template_hash,
    compute_dtype,
    file_fingerprint,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_device,
    resolve_model,
    resolve_quantization,
    tokenizer_fingerprint,
)
from prefcache.reference.config import PrecomputeConfig


def owner_rank(example_id: str, world_size: int) -> int:
    """Which rank scores an id: a hash, so the split does not depend on row order."""
    return int(hashlib.sha1(example_id.encode()).hexdigest()[:8], 16) % world_size


def cache_metadata(config: PrecomputeConfig, source, tokenizer, quantize: str, dtype: str, world_size: int) -> dict:
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
        "prefix_sharing": config.prefix_sharing,  # packed rows: each prompt computed once (prefcache.model.packing)
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
    files = sorted(p for p in resolve_adapter(adapter).iterdir() if p.suffix in (".safetensors", ".bin"))
    return file_fingerprint(files)


def score_sequences(model, sequences: list[tuple[list[int], int]], *, batch_size: int, pad_id: int,
                    chunk_size: int, device: str, on_batch=None) -> list:
    """Score unique (token ids, completion start) sequences, longest first, in padded batches.

    Returns, per sequence, a numpy fp32 array of its completion tokens' log-probs (nats).
    ``on_batch(n_sequences, n_tokens)`` is called after each batch (progress reporting).
    """
    import torch

    from prefcache.model.kernel import collate, token_logprobs  # torch

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
    """Cache columns for ``pairs`` from per-sequence token log-probs keyed by the full token tuple.

    The sums are :func:`~prefcache.model.kernel.pair_sums`, the trainer's own reduction, in float64: the
    per-token values are fp32, their sum need not lose more.
    """
    import torch

    from prefcache.model.kernel import pair_sums  # torch

    chosen = [token_logps[tuple(p.prompt_ids + p.chosen_ids)] for p in pairs]
    rejected = [token_logps[tuple(p.prompt_ids + p.rejected_ids)] for p in pairs]

    def padded(values):  # [B, T] float64 values and their mask
        lengths = torch.tensor([len(v) for v in values])
        tok = torch.zeros(len(values), max((len(v) for v in values), default=0), dtype=torch.float64)
        for row, v in enumerate(values):
            tok[row, : len(v)] = torch.from_numpy(v)
        return tok, torch.arange(tok.shape[1])[None, :] < lengths[:, None]

    (total_c, total_r), (prefix_c, prefix_r), _ = pair_sums(padded(chosen), padded(rejected))
    cols = {"id": [p.id for p in pairs], "chosen_logps": total_c.tolist(), "rejected_logps": total_r.tolist(),
            "chosen_logps_prefix": prefix_c.tolist(), "rejected_logps_prefix": prefix_r.tolist(),
            "prompt_tokens": [len(p.prompt_ids) for p in pairs], "chosen_tokens": [len(p.chosen_ids) for p in pairs],
            "rejected_tokens": [len(p.rejected_ids) for p in pairs],
            "chosen_truncated": [p.chosen_truncated for p in pairs],
            "rejected_truncated": [p.rejected_truncated for p in pairs]}
    if per_token:
        cols["chosen_token_logps"] = [v.tolist() for v in chosen]
        cols["rejected_token_logps"] = [v.tolist() for v in rejected]
    return {name: cols[name] for name in cache_schema(per_token).names}


def precompute(config: PrecomputeConfig | None = None, **options) -> dict:
    """Run the reference model over ``config.data`` and write (or extend) the cache ``config.out``.

    ``precompute(data="prefs.jsonl", out="cache/", quantize="4bit")`` is the same as the CLI.
    Returns a summary dict: pairs cached before and now, pairs scored, bad rows, seconds, pairs/s, tokens/s.
    """
    config = config or PrecomputeConfig(**options)
    if config.unpaired:  # KTO data: one completion per example plus its KL completion
        from prefcache.reference.unpaired import precompute_unpaired  # it imports this module

        with directory_lock(config.out, "prefcache precompute", rank=dist_info()[0]):
            return precompute_unpaired(config, kl_group_size=config.kl_group_size)
    # One writer per cache (per rank under torchrun): a second pass is refused, naming the holder.
    with directory_lock(config.out, "prefcache precompute", rank=dist_info()[0]):
        return _precompute(config)


@dataclass
class DataScan:
    """What reading the data found so far: every scorable id (the coverage check at the end) and the bad rows."""

    data_ids: list = field(default_factory=list)  # Arrow string arrays, one a block: off the Python heap
    bad_rows: list = field(default_factory=list)

    def n_ids(self) -> int:
        return sum(len(a) for a in self.data_ids)

    def ids(self):
        return itertools.chain.from_iterable(a.to_pylist() for a in self.data_ids)


def pending_shards(config: PrecomputeConfig, tokenizer, done: set[str], rank: int, world: int, scan: DataScan):
    """Shards still to score (this rank's ids not yet cached), read block by block: the data is never held
    whole (bounded memory). Fills ``scan`` as it reads."""
    block_rows = config.shard_size * max(1, BLOCK_ROWS // config.shard_size)
    for block, bad in iter_pair_blocks(config.data, tokenizer, config.max_length, config.truncation,
                                       config.on_bad_row, split=config.split, data_config=config.data_config,
                                       mapping=RowMapping.of(config), block_rows=block_rows):
        scan.bad_rows.extend(bad)
        scan.data_ids.append(pa.array([p.id for p in block], pa.string()))
        pending = [p for p in block if p.id not in done and owner_rank(p.id, world) == rank]
        # Longest pairs first: batches of similar length, and an out-of-memory shows up at once.
        pending.sort(key=lambda p: -(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))))
        for s in range(0, len(pending), config.shard_size):
            yield pending[s : s + config.shard_size]


class Progress:
    """The pass's bar. It moves per batch (pairs in proportion to the shard's sequences scored), so its
    pairs/s is live; tokens/s counts the real (unpadded) tokens scored."""

    def __init__(self, bar):
        self.bar, self.tokens, self.t_start = bar, 0, time.perf_counter()
        self.start = self.n_keys = self.n_pairs = self.seqs = 0

    def shard(self, start: int, n_keys: int, n_pairs: int) -> None:
        """A shard of ``n_pairs`` pairs (``n_keys`` unique sequences) begins, the bar at ``start`` pairs."""
        self.start, self.n_keys, self.n_pairs, self.seqs = start, n_keys, n_pairs, 0

    def __call__(self, n_seqs: int, n_tokens: int) -> None:
        self.tokens, self.seqs = self.tokens + n_tokens, self.seqs + n_seqs
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)
        self.bar.update(self.start + int(self.seqs / self.n_keys * self.n_pairs) - self.bar.n)


def cache_to_extend(config: PrecomputeConfig, source, tokenizer, device: str, rank: int, world: int) -> dict:
    """The metadata this pass writes; an existing cache in ``out`` must have been made the same way (what a
    killed pass of this rank left half-written is removed first)."""
    quantize = resolve_quantization(config.quantize, device)
    dtype = str(compute_dtype(quantize, device)).replace("torch.", "")
    meta = cache_metadata(config, source, tokenizer, quantize, dtype, world)
    out = Path(config.out)
    remove_temporaries(out, rank)  # of a killed pass, even when nothing is left to score
    if out.exists() and shard_paths(out):
        have = read_metadata(out)
        if diff := differences(have, meta):
            raise CacheError(f"{out} holds a cache made with other settings; refusing to extend it:\n  "
                             + "\n  ".join(diff) + "\nUse a new --out directory, or the original settings.")
        # An extension keeps the path the cache was made with (the values agree to float rounding either way).
        meta["prefix_sharing"] = bool(have.get("prefix_sharing", False))
    return meta


def score_shard(model, shard: list, config: PrecomputeConfig, *, sharing: bool, pad_id: int, device: str,
                progress: Progress, start: int) -> dict[str, list]:
    """The cache columns of one shard (``start``: pairs scored before it); an identical (prompt, completion)
    sequence is scored once."""
    unique: dict[tuple, int] = {}
    for p in shard:
        for completion in (p.chosen_ids, p.rejected_ids):
            unique.setdefault(tuple(p.prompt_ids + completion), len(p.prompt_ids))
    keys = list(unique)
    progress.shard(start, len(keys), len(shard))
    sequences = [(list(k), unique[k]) for k in keys]
    if sharing:  # a prompt once per packed row, for all of its unique completions in the shard
        from prefcache.model.packing import score_shared  # torch

        logps = score_shared(model, sequences, batch_size=config.batch_size, pad_id=pad_id, chunk_size=config.chunk_size,
                             device=device, max_row=2 * config.max_length, on_batch=progress)
    else:
        logps = score_sequences(model, sequences, batch_size=2 * config.batch_size, pad_id=pad_id,
                                chunk_size=config.chunk_size, device=device, on_batch=progress)
    return shard_columns(shard, dict(zip(keys, logps, strict=True)), config.per_token)


def score_pass(config: PrecomputeConfig, source, meta: dict, shards, *, pad_id: int, device: str, rank: int,
               world: int) -> tuple[int, int]:
    """Load the reference model, score ``shards`` and write each as it is done; returns (pairs, tokens)."""
    from tqdm.auto import tqdm

    from prefcache.model.packing import resolve_sharing  # torch

    out = Path(config.out)
    model, _ = load_model(source, quantize=meta["quantization"], device=device, adapter=config.adapter)
    sharing = meta["prefix_sharing"] = resolve_sharing(model, meta["prefix_sharing"])
    writer = CacheWriter(out, meta, rank=rank)
    if rank == 0:
        writer.write_manifest()
    bar = tqdm(unit="pair", desc=f"precompute{f' rank {rank}' if world > 1 else ''}", disable=not config.progress,
               dynamic_ncols=True)
    progress, scored = Progress(bar), 0
    for shard in shards:
        columns = score_shard(model, shard, config, sharing=sharing, pad_id=pad_id, device=device, progress=progress,
                              start=scored)
        try:
            writer.write(columns)
        except WriteError as e:  # disk full, file-size limit, read-only: the shards written stay whole
            raise WriteError(e.errno, f"{e}; the {scored} pairs of this pass already in {out} are kept: "
                                      "free space and rerun the same command to finish the cache") from e
        scored += len(shard)
        bar.update(scored - bar.n)
    bar.close()
    return scored, progress.tokens


def _precompute(config: PrecomputeConfig) -> dict:
    rank, world, device = setup(resolve_device(config.device))
    t0 = time.perf_counter()
    source = resolve_model(config.model, config.revision)
    tokenizer = load_tokenizer(source)
    meta = cache_to_extend(config, source, tokenizer, device, rank, world)
    out = Path(config.out)
    done = existing_ids(out) if out.exists() else set()
    scan = DataScan()
    shards = pending_shards(config, tokenizer, done, rank, world, scan)
    first = next(shards, None)  # nothing pending: the model is never loaded
    if first is None and not scan.n_ids():  # the whole data was read: not one scorable pair in it
        if not scan.bad_rows:
            raise DataFormatError(f"{config.data} holds no preference rows: nothing to cache")
        if rank == 0:
            write_bad_rows(out / "bad_rows.jsonl", scan.bad_rows)
        raise DataFormatError(f"all {len(scan.bad_rows)} rows of {config.data} are bad rows (listed in "
                              f"{out / 'bad_rows.jsonl'}): nothing to cache")
    scored_pairs = scored_tokens = 0
    if first is not None:
        scored_pairs, scored_tokens = score_pass(config, source, meta, itertools.chain([first], shards),
                                                 pad_id=tokenizer.pad_token_id, device=device, rank=rank, world=world)
    if scan.bad_rows and rank == 0:
        write_bad_rows(out / "bad_rows.jsonl", scan.bad_rows)

    problems: list[str] = []
    barrier(world)
    if rank == 0:
        problems = verify(out, expected_ids=scan.ids())
        if out.exists():
            write_config(config, out / "config.yaml")  # `prefcache precompute --config CACHE/config.yaml`
    elapsed = time.perf_counter() - t0
    return {
        "cache": str(out), "rank": rank, "world_size": world, "pairs_in_data": scan.n_ids(),
        "cached_before": len(done), "scored": scored_pairs, "bad_rows": len(scan.bad_rows), "seconds": elapsed,
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
            from prefcache.data.unpaired import load_unpaired  # it imports this module

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
