"""The data store: tokenised examples written once as an Arrow IPC file, memory-mapped by every later start.

``train`` and ``score`` read their data through here. The first start reads, validates and tokenises the data in
blocks of rows (:func:`~prefcache.data.pairs.iter_tokenized_blocks`,
:func:`~prefcache.data.unpaired.iter_tokenized_unpaired`), writing each block as a record batch of
``<key>.arrow`` (schema :data:`~prefcache.core.schemas.TOKEN_PAIRS` / ``TOKEN_UNPAIRED``: token ids as
``large_list<int32>``, a ``tokens`` column for length grouping, the rendered texts for ``pairs.parquet``); every
start then maps the file (``pyarrow.memory_map``) and reads it through a :class:`~prefcache.data.rows.TokenRows`
view, so no start holds its examples as Python lists, and a second start on the same data tokenises nothing.

The key is a hash of everything the token ids depend on (:func:`store_key`): the data's content (a file's bytes,
a ``datasets`` source's fingerprint), split and subset, the column mapping and templates, the tokenizer's
fingerprint and chat template (given by the caller, which has the model layer's fingerprints), max_length,
truncation, the kind of example and :data:`STORE_VERSION`. Stores live in ``$PREFCACHE_HOME/data`` when that is
set (shared by every run), else in ``RUN/data``. ``<key>.json`` beside a store says what its key was made of and
lists the data's bad rows, so a later start applies ``on_bad_row`` to them as the first did.

Under torchrun rank 0 writes the store (atomically: readers see the whole file or none) and the other ranks wait
at a barrier, then map the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from prefcache.core.atomic import write_atomic, write_json_atomic
from prefcache.core.distributed import barrier, dist_info
from prefcache.core.schemas import EXAMPLE_IMAGES, PAIRS, TOKEN_PAIRS, TOKEN_UNPAIRED, TOKEN_VISION_PAIRS
from prefcache.data import pairs as pair_data
from prefcache.data.badrows import BadRow, _apply_policy, _check_policy
from prefcache.data.formats import DataFormatError, open_dataset
from prefcache.data.pairs import iter_tokenized_blocks
from prefcache.data.rows import TokenRows
from prefcache.data.tokens import TokenizedPair
from prefcache.data.unpaired import TokenizedCompletion, iter_tokenized_unpaired
from prefcache.data.vision_pairs import VISION_BLOCK_ROWS, TokenizedVisionPair, iter_vision_tokenized_blocks

STORE_VERSION = 1  # raise it when a change to reading or tokenising data changes what a store holds


def store_folder(run_dir: str | os.PathLike) -> Path:
    """Where data stores live: ``$PREFCACHE_HOME/data`` when set, else the run's ``data`` folder."""
    home = os.environ.get("PREFCACHE_HOME")
    return Path(home) / "data" if home else Path(run_dir) / "data"


def data_fingerprint(path: str | os.PathLike, split: str | None, data_config: str | None) -> str:
    """A data file's content hash (read once per start: ~1 s a GB, against minutes of tokenising), or a
    ``datasets`` source's own fingerprint (Hub ids, dataset folders: memory-mapped Arrow that datasets keys)."""
    file = Path(path).expanduser()
    if file.is_file():
        h = hashlib.blake2b(file.suffix.lower().encode(), digest_size=16)  # the suffix decides the format
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()
    dataset = open_dataset(path, split, data_config)
    return f"datasets:{dataset._fingerprint}:{len(dataset)}"


def store_key(kind: str, path, *, split, data_config, mapping, tokenizer_key: dict, max_length: int,
              truncation: str) -> dict:
    """What a store's token ids depend on; its file name is a hash of this (:func:`store_name`)."""
    return {"version": STORE_VERSION, "kind": kind, "data": data_fingerprint(path, split, data_config),
            "split": split, "data_config": data_config, "mapping": mapping.record() if mapping else None,
            **tokenizer_key, "max_length": max_length, "truncation": truncation}


def store_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def open_store(folder: Path, key: dict, schema: pa.Schema, make: type, blocks, *,
               world: int) -> tuple[TokenRows, list[BadRow]]:
    """The store of ``key`` in ``folder``, written first if there is none: rank 0 writes the record batches
    ``blocks(bad)`` yields (appending the data's bad rows to ``bad``), the other ranks wait for it."""
    path = Path(folder) / f"{store_name(key)}.arrow"
    failed = None
    if dist_info()[0] == 0 and not (path.exists() and path.with_suffix(".json").exists()):
        try:
            _write_store(path, key, schema, blocks)
        except BaseException as e:  # reach the barrier all the same: the other ranks must not wait for ever
            failed = e
    barrier(world)
    if failed is not None:
        raise failed
    if not path.exists():
        raise RuntimeError(f"rank 0 did not write the data store {path}: see its error")
    return read_store(path, make)


def _write_store(path: Path, key: dict, schema: pa.Schema, blocks) -> None:
    def write(tmp: str) -> None:
        bad: list[BadRow] = []
        with pa.ipc.new_file(tmp, schema) as writer:
            for batch in blocks(bad):
                writer.write_batch(batch)
        bad.sort(key=lambda b: b.row)  # as a whole read lists them (a block may report an earlier block's rows)
        # Before the store's own rename: a store on disk always has its bad rows beside it.
        write_json_atomic({"key": key, "bad_rows": [asdict(b) for b in bad]}, path.with_suffix(".json"))

    write_atomic(path, write)


def read_store(path: Path, make: type) -> tuple[TokenRows, list[BadRow]]:
    """A store mapped into memory (zero-copy: its pages are read when touched), and its data's bad rows."""
    table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    info = json.loads(path.with_suffix(".json").read_text())
    return TokenRows(table, make, path=str(path)), [BadRow(**b) for b in info["bad_rows"]]


def _batch(schema: pa.Schema, make: type, items: list, examples: list) -> pa.RecordBatch:
    """One block's examples as a record batch: fields of the tokenised items, the rest from the rendered examples."""
    own = {f.name for f in fields(make)}
    cols = {name: [getattr(x, name) for x in (items if name in own else examples)]
            for name in schema.names if name != "tokens"}
    if "images" in cols:  # ImageRef tuples as the store's structs
        cols["images"] = [[asdict(r) for r in refs] for refs in cols["images"]]
    cols["tokens"] = [sum(len(v) for k, v in vars(i).items() if k.endswith("_ids")) for i in items]
    return pa.RecordBatch.from_pydict(cols, schema=schema)


def pair_rows(path, tokenizer, max_length: int, truncation: str = "keep_start", on_bad_row: str = "fail", *,
              split: str | None = None, data_config: str | None = None, mapping=None, tokenizer_key: dict,
              folder: Path, world: int = 1, processor=None) -> tuple[TokenRows, list[BadRow]]:
    """:func:`~prefcache.data.pairs.load_dataset_pairs`'s pairs (same pairs, order and bad rows) as a view over
    their store, written in blocks of :data:`~prefcache.data.pairs.BLOCK_ROWS` rows when there is none yet.

    ``processor``: a vision-language model's. Its pairs are tokenised by it
    (:func:`~prefcache.data.vision_pairs.iter_vision_tokenized_blocks`), each with its images' references (a path,
    or the encoded bytes), not their pixels; ``tokenizer_key`` then includes the processor's fingerprint."""
    if processor is None:
        read = lambda: iter_tokenized_blocks(path, tokenizer, max_length, truncation, split=split,  # noqa: E731
                                             data_config=data_config, mapping=mapping,
                                             block_rows=pair_data.BLOCK_ROWS)
        kind, schema, make = "pairs", TOKEN_PAIRS, TokenizedPair
    else:
        read = lambda: iter_vision_tokenized_blocks(path, processor, max_length, truncation,  # noqa: E731
                                                    split=split, data_config=data_config, mapping=mapping,
                                                    block_rows=VISION_BLOCK_ROWS)
        kind, schema, make = "vision_pairs", TOKEN_VISION_PAIRS, TokenizedVisionPair
    key = store_key(kind, path, split=split, data_config=data_config, mapping=mapping,
                    tokenizer_key=tokenizer_key, max_length=max_length, truncation=truncation)
    return _store_rows(path, key, schema, make, read, on_bad_row, folder=folder, world=world)


def unpaired_rows(path, tokenizer, max_length: int, truncation: str = "keep_start", on_bad_row: str = "fail", *,
                  split: str | None = None, data_config: str | None = None, tokenizer_key: dict, folder: Path,
                  world: int = 1) -> tuple[TokenRows, list[BadRow]]:
    """:func:`~prefcache.data.unpaired.load_unpaired`'s items (same items, order and bad rows; paired data
    unpaired) as a view over their store, written in blocks of :data:`~prefcache.data.pairs.BLOCK_ROWS` rows
    when there is none yet. No KL groups: the trainer takes each example's KL partner from the cache's kl_id."""
    read = lambda: iter_tokenized_unpaired(path, tokenizer, max_length, truncation, unpair=True,  # noqa: E731
                                           split=split, data_config=data_config, block_rows=pair_data.BLOCK_ROWS)
    key = store_key("unpaired", path, split=split, data_config=data_config, mapping=None,
                    tokenizer_key=tokenizer_key, max_length=max_length, truncation=truncation)
    return _store_rows(path, key, TOKEN_UNPAIRED, TokenizedCompletion, read, on_bad_row, folder=folder, world=world)


def _store_rows(path, key: dict, schema: pa.Schema, make: type, read, on_bad_row: str, *, folder: Path,
                world: int) -> tuple[TokenRows, list[BadRow]]:
    """The view over the store ``key`` names, written from ``read()``'s (items, bad rows, examples) blocks when
    there is none yet; the bad-row policy applied to its bad rows."""
    _check_policy(on_bad_row)

    def blocks(bad: list[BadRow]):
        with _naming(path):
            for items, block_bad, examples in read():
                bad += block_bad
                if items:  # a block of bad rows only (or of pairs all waiting to be unpaired) gives none
                    yield _batch(schema, make, items, examples)

    rows, bad = open_store(folder, key, schema, make, blocks, world=world)
    _apply_policy(bad, on_bad_row, str(path))
    return rows, bad


@contextmanager
def _naming(path):
    """Data format errors naming the data, as a whole read's do (a block reader's may not)."""
    try:
        yield
    except DataFormatError as e:
        raise e if str(path) in str(e) else DataFormatError(f"{path}: {e}") from None


def text_batches(views: list[TokenRows]):
    """The rendered texts of the stores under ``views`` as record batches of :data:`~prefcache.core.schemas.PAIRS`
    (``pairs.parquet``), an id of an earlier store left out. Read a batch at a time from the file, not the map:
    a batch's pages are memory of this call alone. An unpaired example's completion is its chosen text when
    desirable, else its rejected one."""
    seen, stores = [], {}
    for v in views:
        stores.setdefault(v.path, v)
    for path, view in stores.items():
        reader = pa.ipc.open_file(pa.OSFile(path))
        earlier = pa.chunked_array([c for ids in seen for c in ids.chunks], pa.string()).combine_chunks()
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            if len(earlier):
                batch = batch.filter(pc.invert(pc.is_in(batch.column("id"), value_set=earlier)))
            yield _texts(batch)
        seen.append(view.table.column("id"))


def example_images(views: list[TokenRows]) -> pa.Table:
    """The images of every example in the vision stores under ``views`` (:data:`~prefcache.core.schemas.EXAMPLE_IMAGES`:
    id, position in its prompt, sha256, path), an id of an earlier store left out: references, never the pixels
    or an inline image's bytes. Read a record batch at a time, as :func:`text_batches`."""
    parts, seen, earlier = [], [], pa.array([], pa.string())
    for path in dict.fromkeys(v.path for v in views):
        reader = pa.ipc.open_file(pa.OSFile(path))
        for batch in map(reader.get_batch, range(reader.num_record_batches)):  # a store's ids are unique already
            keep = pc.invert(pc.is_in(batch.column("id"), value_set=earlier))
            ids, images = batch.column("id").filter(keep), batch.column("images").filter(keep)
            parent = pc.list_parent_indices(images).to_numpy()
            offsets = images.offsets.to_numpy()
            flat = pc.list_flatten(images)
            parts.append(pa.table([ids.take(pa.array(parent, pa.int64())),
                                   pa.array(np.arange(len(parent)) + offsets[0] - offsets[parent], pa.int32()),
                                   pc.struct_field(flat, "sha256"), pc.struct_field(flat, "path")],
                                  schema=EXAMPLE_IMAGES))
            seen.append(ids.cast(pa.string()))
        earlier = pa.concat_arrays([earlier, *seen])
        seen = []
    return pa.concat_tables(parts) if parts else EXAMPLE_IMAGES.empty_table()


def _texts(batch: pa.RecordBatch) -> pa.RecordBatch:
    get = batch.column
    if "completion" in batch.schema.names:
        null = pa.nulls(batch.num_rows, pa.large_string())
        chosen, rejected = pc.if_else(get("label"), get("completion"), null), pc.if_else(get("label"), null,
                                                                                         get("completion"))
    else:
        chosen, rejected = get("chosen"), get("rejected")
    return pa.RecordBatch.from_arrays([get("id"), *(c.cast(pa.string()) for c in (get("prompt"), chosen, rejected))],
                                      schema=PAIRS)
