"""Unpaired preference data (TRL's KTO format) and its reference cache, with KL completions.

Format (TRL's "unpaired preference"): ``prompt``, ``completion`` and a boolean ``label`` (True =
desirable), standard (strings) or conversational (message lists), rendered and tokenised exactly as
pairs are (:mod:`prefcache.data`: EOS appended to standard completions, chat template otherwise, the
joint tokenisation, keep_start truncation, prompts of ``>= max_length`` tokens are bad rows).
Paired data is unpaired on request as TRL's ``unpair_preference_dataset`` does: per block of 1000
pairs, the chosen completions (label True), then the rejected ones (label False).

KL completions: KTO's reference point z is estimated from *mismatched* (prompt, completion) pairs. As
TRL's KTOTrainer builds them, the examples are taken in data order in groups of ``kl_group_size`` (TRL's
per-device batch size) and each prompt is given the previous example's completion, the first the last
one's: (x1, yn), (x2, y1), ..., (xn, yn-1). The cache stores, per example id, the reference log-prob of
its own completion (``logps``), the id of the example whose completion is its KL completion (``kl_id``)
and the reference log-prob of that mismatched sequence (``kl_logps``). The trainer rebuilds the same KL
sequences from ``kl_id``, so nothing depends on row order at training time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .data import (
    BadRow,
    Example,
    _apply_policy,
    _Bad,
    _canonical,
    _render,
    _truncate,
    prepare_examples,
    tokenize_examples,
)
from .formats import DataFormatError, load_rows

UNPAIR_BLOCK = 1000  # datasets.map's default batch size: the block TRL's unpairing works in
DEFAULT_KL_GROUP = 8  # TRL's default per_device_train_batch_size


@dataclass(frozen=True)
class UnpairedExample:
    """One rendered (prompt, completion, label) example."""

    id: str
    row: int
    prompt: str
    completion: str
    label: bool
    conversational: bool = False


@dataclass(frozen=True)
class TokenizedCompletion:
    """Token ids of one example: the model sees ``prompt_ids + completion_ids`` (at most max_length)."""

    id: str
    label: bool
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool


def is_unpaired(rows: list) -> bool:
    """True for TRL's unpaired format (a ``completion`` and a ``label`` column, no chosen/rejected)."""
    dicts = [r for r in rows[:100] if isinstance(r, dict)]
    return bool(dicts) and all("completion" in r and "label" in r and "chosen" not in r for r in dicts)


def unpaired_id(prompt, completion, label: bool) -> str:
    """Content hash of the raw fields, as :func:`prefcache.data.example_id` for pairs."""
    key = json.dumps({"prompt": _canonical(prompt), "completion": _canonical(completion), "label": bool(label)},
                     sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=repr)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def prepare_unpaired(rows: list[dict], tokenizer, on_bad_row: str = "fail",
                     unpair: bool = False) -> tuple[list[UnpairedExample], list[BadRow]]:
    """Validate and render unpaired rows; paired rows (prompt/chosen/rejected) need ``unpair=True``.

    Ids: the ``id`` column (for paired data: the pair's id + ``-chosen`` / ``-rejected``), else a content hash.
    """
    if not is_unpaired(rows):
        if not unpair:
            raise DataFormatError("this is not unpaired data (prompt, completion, boolean label): pass unpair=True "
                                  "(--unpair) to turn prompt/chosen/rejected pairs into unpaired examples")
        pairs, bad = prepare_examples(rows, tokenizer, on_bad_row)
        out = []
        for start in range(0, len(pairs), UNPAIR_BLOCK):  # TRL: per map block, chosens then rejecteds
            block = pairs[start : start + UNPAIR_BLOCK]
            for label, side in ((True, "chosen"), (False, "rejected")):
                out += [UnpairedExample(f"{p.id}-{side}", p.row, p.prompt, getattr(p, side), label, p.conversational)
                        for p in block]
        return out, bad
    has_id = any(isinstance(r, dict) and "id" in r for r in rows)
    examples, bad, seen = [], [], {}
    for i, row in enumerate(rows):
        ex_id = None
        try:
            if not isinstance(row, dict):
                raise _Bad(f"a row must be an object with prompt/completion/label, got a {type(row).__name__}")
            for name in ("prompt", "completion", "label"):
                if row.get(name) is None:
                    raise _Bad(f"{'null' if name in row else 'missing'} field '{name}'")
            if not isinstance(row["label"], bool):
                raise _Bad(f"'label' must be a boolean (True = desirable), got {type(row['label']).__name__}")
            ex_id = str(row["id"]) if has_id and row.get("id") not in (None, "") else None
            if has_id and ex_id is None:
                raise _Bad("'id' is missing or null (the file has an id column, so every row needs one)")
            ex_id = ex_id or unpaired_id(row["prompt"], row["completion"], row["label"])
            content = unpaired_id(row["prompt"], row["completion"], row["label"])
            if ex_id in seen:
                if seen[ex_id][1] == content:
                    continue  # an exact duplicate
                raise _Bad(f"id {ex_id!r} is already used by row {seen[ex_id][0]} for different content")
            # The pair renderer with the completion on both sides: one code path for templates and EOS.
            prompt, completion, _, chat = _render({"prompt": row["prompt"], "chosen": row["completion"],
                                                   "rejected": row["completion"]}, tokenizer)
            seen[ex_id] = (i, content)
            examples.append(UnpairedExample(ex_id, i, prompt, completion, row["label"], chat))
        except _Bad as e:
            bad.append(BadRow(i, ex_id, str(e)))
    _apply_policy(bad, on_bad_row)
    return examples, bad


def tokenize_unpaired(examples: list[UnpairedExample], tokenizer, max_length: int, truncation: str = "keep_start",
                      on_bad_row: str = "fail") -> tuple[list[TokenizedCompletion], list[BadRow]]:
    """TRL's joint tokenisation and truncation (:func:`prefcache.data.tokenize_examples`, one completion)."""
    as_pairs = [Example(e.id, e.row, e.prompt, e.completion, e.completion, e.conversational) for e in examples]
    pairs, bad = tokenize_examples(as_pairs, tokenizer, max_length, truncation, on_bad_row)
    label = {e.id: e.label for e in examples}
    return [TokenizedCompletion(p.id, label[p.id], p.prompt_ids, p.chosen_ids, p.chosen_truncated) for p in pairs], bad


def load_unpaired(path: str | os.PathLike, tokenizer, max_length: int, truncation: str = "keep_start",
                  on_bad_row: str = "fail", *, unpair: bool = False, split: str | None = None,
                  data_config: str | None = None):
    """Load, validate and tokenise unpaired data (a file, a datasets folder or a Hub dataset: ``split``,
    ``data_config`` as for pairs). Returns (items, bad rows, examples), aligned one to one."""
    rows = load_rows(path, split, data_config)
    examples, bad = prepare_unpaired(rows, tokenizer, "skip", unpair)
    items, bad_tokens = tokenize_unpaired(examples, tokenizer, max_length, truncation, "skip")
    bad = sorted(bad + bad_tokens, key=lambda b: b.row)
    _apply_policy(bad, on_bad_row, str(path))
    kept = {i.id for i in items}
    return items, bad, [e for e in examples if e.id in kept]


def kl_partners(ids: list[str], group_size: int) -> dict[str, str]:
    """id -> the id whose completion is its KL completion: TRL's rotation by one within each group of
    ``group_size`` consecutive examples, [y1..yn] -> [yn, y1, ..., yn-1]."""
    partners = {}
    for start in range(0, len(ids), group_size):
        group = ids[start : start + group_size]
        for k, ident in enumerate(group):
            partners[ident] = group[k - 1]
    return partners


def kl_sequence(item: TokenizedCompletion, partner: TokenizedCompletion, max_length: int,
                truncation: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of ``item``'s prompt with ``partner``'s completion, truncated as pairs are."""
    prompt, completion, _ = _truncate(item.prompt_ids, partner.completion_ids, partner.completion_ids, max_length,
                                      truncation)
    return prompt, completion


def check_no_mapping(config) -> None:
    """Column mappings and templates (``--columns``, ``--*-template``) are for pairs; refuse them here."""
    from .columns import RowMapping

    if RowMapping.of(config):
        raise ValueError("--columns and the --*-template options are not supported for unpaired data yet: give "
                         "the data prompt, completion and label columns")


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

    ``config`` is a :class:`~prefcache.config.PrecomputeConfig` (per_token is not supported here). Paired data
    is unpaired (``unpair``). Resumable like the pair cache (ids already cached are skipped); under torchrun each
    rank scores the ids that hash to it (every rank reads all the data: KL partners may belong to another rank).
    """
    from tqdm.auto import tqdm

    from .cache import CacheError, CacheWriter, differences, existing_ids, read_metadata, schema, shard_paths
    from .models import (
        compute_dtype,
        load_model,
        load_tokenizer,
        resolve_device,
        resolve_model,
        resolve_quantization,
    )
    from .reference import cache_metadata, dist_info, init_distributed, owner_rank, score_sequences

    if config.per_token:
        raise ValueError("--per-token is not supported for unpaired caches")
    check_no_mapping(config)
    rank, world = dist_info()
    if world > 1:
        init_distributed(config.device)
    t0 = time.perf_counter()
    source = resolve_model(config.model)
    device = resolve_device(config.device)
    if world > 1 and device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
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
        from .data import write_bad_rows

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
        writer = CacheWriter(out, meta, rank=rank, table_schema=schema(kind="unpaired"))
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
    from .cache import verify

    if world > 1:
        import torch.distributed as tdist

        tdist.barrier()
    problems = verify(out, expected_ids=[i.id for i in items]) if rank == 0 else []
    elapsed = time.perf_counter() - t0
    return {"cache": str(out), "rank": rank, "world_size": world, "examples_in_data": len(items),
            "cached_before": len(done),
            "scored": len(pending), "bad_rows": len(bad_rows), "seconds": elapsed, "problems": problems,
            "pairs_per_s": len(pending) / elapsed, "tokens_per_s": tokens / elapsed, "config": asdict(config),
            "kl_group_size": kl_group_size}


class UnpairedReference:
    """An unpaired cache's values keyed by example id."""

    COLUMNS = ("logps", "kl_logps", "prompt_tokens", "completion_tokens", "kl_tokens")

    def __init__(self, table, metadata: dict, path: str):
        import torch

        self.metadata, self.path = metadata, path
        self.index = {ident: i for i, ident in enumerate(table.column("id").to_pylist())}
        self.kl_id = table.column("kl_id").to_pylist()
        self.values = {c: torch.tensor(table.column(c).to_numpy(), dtype=torch.float64) for c in self.COLUMNS}

    @classmethod
    def from_cache(cls, cache_dir: str | os.PathLike) -> UnpairedReference:
        from .cache import CacheError, read_cache, read_metadata

        meta = read_metadata(cache_dir)
        if meta.get("kind") != "unpaired":
            raise CacheError(f"{cache_dir} is a cache of pairs; kto and apo_zero_unpaired need an unpaired cache "
                             "(prefcache precompute --unpaired)")
        return cls(read_cache(cache_dir, columns=["id", "kl_id", *cls.COLUMNS]), meta, str(cache_dir))

    def require(self, items: list[TokenizedCompletion], what: str) -> None:
        """Every id cached, with this run's token counts (else the content changed since precompute)."""
        from .cache import CacheError

        if missing := [i.id for i in items if i.id not in self.index]:
            raise CacheError(f"{len(missing)} of {len(items)} {what} example ids are not in the cache {self.path}, "
                             f"e.g. {', '.join(missing[:5])}. Run `prefcache precompute --unpaired` on this data.")
        wrong = [i.id for i in items if (len(i.prompt_ids), len(i.completion_ids)) != tuple(
            int(self.values[c][self.index[i.id]]) for c in ("prompt_tokens", "completion_tokens"))]
        if wrong:
            raise CacheError(f"{len(wrong)} {what} examples have other token counts than the cache {self.path} "
                             f"records, e.g. {', '.join(wrong[:5])}: re-run precompute into a new cache.")

    def partner(self, ident: str) -> str:
        return self.kl_id[self.index[ident]]

    def lookup(self, ids) -> dict:
        import torch

        rows = torch.tensor([self.index[i] for i in ids], dtype=torch.long)
        return {c: v[rows] for c, v in self.values.items()}
