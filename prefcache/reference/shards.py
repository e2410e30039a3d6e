"""The precompute pass: one run of the frozen reference model over a preference dataset, for every kind of
example (:mod:`prefcache.reference.kinds`: pairs, unpaired examples with their KL completions).

Resumable and incremental by construction: the ids already in the cache are skipped, pending examples are
scored shard by shard, and each shard lands atomically. Under ``torchrun`` / ``accelerate launch``
each rank scores the ids that hash to it and writes its own shards; rank 0 checks coverage at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from prefcache.cache.store import (
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
from prefcache.core.distributed import barrier, dist_info, gather, setup
from prefcache.core.locking import directory_lock
from prefcache.core.runconfig import write_config
from prefcache.data import pairs as pair_data
from prefcache.data.pairs import DataFormatError, write_bad_rows
from prefcache.model.load import (
    compute_dtype,
    resolve_device,
    resolve_model,
    resolve_quantization,
    tokenizer_fingerprint,
)
from prefcache.model.tokenization import load_tokenization
from prefcache.model.vision import processor_record
from prefcache.reference.config import PrecomputeConfig, check_cache_out
from prefcache.reference.kinds import data_ids, kind_of, shard_columns
from prefcache.reference.metadata import cache_metadata
from prefcache.reference.scoring import Progress, load_scorer, score_shard

__all__ = ["precompute", "verify_cache", "owner_rank", "cache_metadata", "shard_columns"]


def owner_rank(example_id: str, world_size: int) -> int:
    """Which rank scores an id: a hash, so the split does not depend on row order."""
    return int(hashlib.sha1(example_id.encode()).hexdigest()[:8], 16) % world_size


def precompute(config: PrecomputeConfig | None = None, **options) -> dict:
    """Run the reference model over ``config.data`` and write (or extend) the cache ``config.out``.

    ``precompute(data="prefs.jsonl", out="cache/", quantize="4bit")`` is the same as the CLI; ``unpaired=True``
    caches unpaired (KTO) examples and their KL completions. Returns a summary dict: examples cached before and
    now, scored, bad rows, seconds, pairs/s (examples/s for unpaired), tokens/s, and the MB of reference weights
    this rank held (``reference_mb_per_rank``: 1/N of the model with ``fsdp`` on N ranks; None when nothing was
    pending).
    """
    config = config or PrecomputeConfig(**options)
    kind = kind_of(config)
    kind.check()
    check_cache_out(config.out)
    # One writer per cache (per rank under torchrun): a second pass is refused, naming the holder.
    with directory_lock(config.out, "prefcache precompute", rank=dist_info()[0]):
        return _precompute(config, kind)


@dataclass
class DataScan:
    """What reading the data found so far: every scorable id (the coverage check at the end), the bad rows and
    how many blocks were read."""

    data_ids: list = field(default_factory=list)  # Arrow string arrays, one a block: off the Python heap
    bad_rows: list = field(default_factory=list)
    blocks: int = 0

    def n_ids(self) -> int:
        return sum(len(a) for a in self.data_ids)

    def ids(self):
        return itertools.chain.from_iterable(a.to_pylist() for a in self.data_ids)


def pending_shards(config: PrecomputeConfig, kind, tokenizer, done: set[str], rank: int, world: int,
                   scan: DataScan):
    """Shards still to score (this rank's ids not yet cached), read block by block: the data is never held
    whole (bounded memory). Fills ``scan`` as it reads."""
    # Read through the module, not imported by name: a block size set there (a test, a tight machine) reaches here.
    block_rows = config.shard_size * max(1, pair_data.BLOCK_ROWS // config.shard_size)  # whole shards per block
    for block, bad in kind.blocks(tokenizer, block_rows):
        scan.blocks += 1
        scan.bad_rows.extend(bad)
        scan.data_ids.append(pa.array([e.id for e in block], pa.string()))
        pending = [e for e in block if e.id not in done and owner_rank(e.id, world) == rank]
        # Longest first: batches of similar length, and an out-of-memory shows up at once.
        pending.sort(key=lambda e: -kind.length(e))
        for s in range(0, len(pending), config.shard_size):
            yield pending[s : s + config.shard_size]


def cache_to_extend(config: PrecomputeConfig, kind, source, tokenizer, device: str, rank: int, world: int) -> dict:
    """The metadata this pass writes; an existing cache in ``out`` must have been made the same way (what a
    killed pass of this rank left half-written is removed first)."""
    quantize = resolve_quantization(config.quantize, device)
    dtype = str(compute_dtype(quantize, device)).replace("torch.", "")
    meta = cache_metadata(config, source, tokenizer, quantize, dtype, world) | kind.metadata()
    out = Path(config.out)
    remove_temporaries(out, rank)  # of a killed pass, even when nothing is left to score
    if out.exists() and shard_paths(out):
        have = read_metadata(out)
        if diff := differences(have, meta):
            raise CacheError(f"{out} holds a cache made with other settings; refusing to extend it:\n  "
                             + "\n  ".join(diff) + "\nUse a new --out directory, or the original settings.")
        # An extension keeps the path the cache was made with (the values agree to float rounding either way);
        # caches written before unpaired examples were shared say False.
        meta["prefix_sharing"] = bool(have.get("prefix_sharing", False))
    return meta


def score_pass(config: PrecomputeConfig, kind, source, meta: dict, shards, *, pad_id: int, device: str, rank: int,
               world: int) -> tuple[int, int, float]:
    """Load the reference model, score ``shards`` and write each as it is done; returns (examples, tokens, MB of
    reference weights this rank held).
    With ``--fsdp`` under torchrun the model is sharded across the ranks, each still scoring its own ids."""
    from tqdm.auto import tqdm

    from prefcache.model.packing import resolve_sharing  # torch
    from prefcache.model.sharding import local_mb

    out = Path(config.out)
    model, scorer = load_scorer(config, source, meta["quantization"], device, pad_id, world)
    weights_mb = local_mb(scorer)
    sharing = meta["prefix_sharing"] = resolve_sharing(model, meta["prefix_sharing"])
    writer = CacheWriter(out, meta, rank=rank, table_schema=kind.schema())
    if rank == 0:
        writer.write_manifest()
    bar = tqdm(unit=kind.unit, desc=f"precompute{f' rank {rank}' if world > 1 else ''}", disable=not config.progress,
               dynamic_ncols=True)
    progress, scored = Progress(bar), 0
    for shard in shards:
        columns = score_shard(scorer, shard, config, kind, sharing=sharing, pad_id=pad_id, device=device,
                              progress=progress, start=scored, processor=getattr(kind, "processor", None))
        try:
            writer.write(columns)
        except WriteError as e:  # disk full, file-size limit, read-only: the shards written stay whole
            raise WriteError(e.errno, f"{e}; the {scored} {kind.unit}s of this pass already in {out} are kept: "
                                      "free space and rerun the same command to finish the cache") from e
        scored += len(shard)
        bar.update(scored - bar.n)
    if hasattr(scorer, "drain"):  # a Lockstep
        scorer.drain()  # this rank's ids are done: the others' forwards still need it
    bar.close()
    return scored, progress.tokens, weights_mb


def _precompute(config: PrecomputeConfig, kind) -> dict:
    rank, world, device = setup(resolve_device(config.device))
    t0 = time.perf_counter()
    source = resolve_model(config.model, config.revision)
    tokenizer, processor = load_tokenization(source)
    if processor is not None:  # a vision-language model: its pairs' prompts hold images
        kind = kind_of(config, processor)
        kind.check()
    meta = cache_to_extend(config, kind, source, tokenizer, device, rank, world)
    out = Path(config.out)
    done = existing_ids(out) if out.exists() else set()
    scan = DataScan()
    shards = pending_shards(config, kind, tokenizer, done, rank, world, scan)
    first = next(shards, None)  # nothing pending: the model is never loaded
    if first is None and not scan.n_ids():  # the whole data was read: not one scorable example in it
        if not scan.bad_rows:
            raise DataFormatError(f"{config.data} holds no preference rows: nothing to cache")
        if rank == 0:
            write_bad_rows(out / "bad_rows.jsonl", scan.bad_rows)
        raise DataFormatError(f"all {len(scan.bad_rows)} rows of {config.data} are bad rows (listed in "
                              f"{out / 'bad_rows.jsonl'}): nothing to cache")
    scored = tokens = 0
    weights_mb = None  # no model loaded: nothing pending
    pending = first is not None
    if config.fsdp and world > 1:  # a sharded model runs on every rank or on none
        pending = any(gather(pending, world))
    if pending:
        scored, tokens, weights_mb = score_pass(config, kind, source, meta, itertools.chain([first] if first else [], shards),
                                    pad_id=tokenizer.pad_token_id, device=device, rank=rank, world=world)
    if scan.bad_rows and rank == 0:
        # In row order: unpaired data reports a pair's tokenisation problems when its block of pairs is unpaired.
        write_bad_rows(out / "bad_rows.jsonl", sorted(scan.bad_rows, key=lambda b: b.row))
    problems: list[str] = []
    barrier(world)
    if rank == 0:
        problems = verify(out, expected_ids=scan.ids())
        if out.exists():
            write_config(config, out / "config.yaml")  # `prefcache precompute --config CACHE/config.yaml`
    elapsed = time.perf_counter() - t0
    return {
        "cache": str(out), "rank": rank, "world_size": world, **kind.summary(scan.n_ids()), "data_blocks": scan.blocks,
        "cached_before": len(done), "scored": scored, "bad_rows": len(scan.bad_rows), "seconds": elapsed,
        "pairs_per_s": scored / elapsed if elapsed else 0.0, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "problems": problems, "config": asdict(config), "reference_mb_per_rank": weights_mb,
    }


def verify_cache(cache_dir: str, data: str | None = None, *, split: str | None = None,
                 data_config: str | None = None) -> dict:
    """Check a cache's shards (integrity, consistent metadata, duplicates, NaN/inf) and, given the
    data it was made from, that every scorable id of the data is present exactly once.

    The data is tokenised as the cache says (its tokenizer, max_length, truncation, kind), so rows the
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
        tokenizer, processor = load_tokenization(resolve_model(meta.get("model_path")))
        if tokenizer_fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
            problems.append(f"the tokenizer at {meta.get('model_path')} is not the one that made this cache")
        problems += [f"the model at {meta.get('model_path')}: {line}"
                     for line in differences(meta, processor_record(processor), ("processor_fingerprint",))]
        expected, bad_rows = data_ids(meta, data, tokenizer, split=split, data_config=data_config,
                                      processor=processor if meta.get("processor_fingerprint") else None)
        problems += new_bad_rows(Path(cache_dir), bad_rows)
    problems += verify(cache_dir, expected_ids=expected)
    if problems:
        return {"summary": f"{cache_dir}: NOT OK", "problems": problems}
    info = summary(cache_dir)
    covered = f", covers all {len(set(expected))} ids of {data}" if expected is not None else ""
    return {"summary": f"{cache_dir}: OK ({info['shards']} shards, {info['rows']} rows, no NaN/inf, "
                       f"no duplicate ids{covered})", "problems": []}


def new_bad_rows(cache: Path, bad_rows: list) -> list[str]:
    """Problems for rows of the data that are bad now but were not when the cache was made (not in its
    ``bad_rows.jsonl``): an image file gone, changed or damaged since, a row edited into a bad one."""
    listed = cache / "bad_rows.jsonl"
    known = {json.loads(line)["row"] for line in listed.read_text().splitlines() if line.strip()} if listed.exists() else set()
    fresh = [b for b in bad_rows if b.row not in known]
    return [f"a bad row of the data now, not when the cache was made: {b}" for b in fresh[:20]] + (
        [f"... and {len(fresh) - 20} more bad rows"] if len(fresh) > 20 else [])
