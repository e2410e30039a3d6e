"""The data store: tokenised once per (data, mapping, tokenizer, template, max_length, truncation), memory-mapped
after; its view gives the in-memory tokenisation's examples; rank 0 writes it while the other ranks wait."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import preference_rows, write_jsonl

from prefcache.data import store as store_mod
from prefcache.data.badrows import BadDataError
from prefcache.data.columns import RowMapping
from prefcache.data.formats import DataFormatError
from prefcache.data.pairs import load_dataset_pairs
from prefcache.data.rows import IdIndex, TokenRows
from prefcache.data.store import pair_rows, read_store, store_key, store_name, text_batches, unpaired_rows
from prefcache.data.unpaired import load_unpaired
from prefcache.model.tokenization import tokenizer_key
from prefcache.training.state import epoch_order


class SpyTokenizer:
    """The tokenizer, counting the calls that tokenise text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def data(tmp_path):
    rows = preference_rows(40)
    rows[3] = {**rows[3], "chosen": ""}  # a bad row: stored, and the policy applied to it on every start
    return write_jsonl(tmp_path / "d.jsonl", rows)


def opts(tokenizer, tmp_path, **kw):
    return {"tokenizer_key": tokenizer_key(tokenizer), "folder": tmp_path / "stores", **kw}


def test_the_store_holds_what_tokenising_in_memory_gives(data, tokenizer, tmp_path):
    pairs, bad, _ = load_dataset_pairs(data, tokenizer, 48, on_bad_row="skip")
    rows, stored_bad = pair_rows(data, tokenizer, 48, on_bad_row="skip", **opts(tokenizer, tmp_path))
    assert len(rows) == len(pairs) == 39 and list(rows) == pairs and stored_bad == bad
    assert rows.ids() == [p.id for p in pairs]
    assert rows.lengths().tolist() == [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert list(rows[2::5]) == pairs[2::5] and rows[-1] == pairs[-1]
    assert rows[2::5].counts("chosen_ids").tolist() == [len(p.chosen_ids) for p in pairs[2::5]]
    with pytest.raises(IndexError):
        rows[len(pairs)]
    items, ubad, examples = load_unpaired(data, tokenizer, 48, on_bad_row="skip", unpair=True)
    urows, ustored = unpaired_rows(data, tokenizer, 48, on_bad_row="skip", **opts(tokenizer, tmp_path))
    assert list(urows) == items and ustored == ubad
    index = IdIndex([urows])
    assert index[items[5].id] == items[5] and index.find("nope") is None
    assert index.missing(["nope", items[0].id]) == ["nope"]
    texts = pa.Table.from_batches(list(text_batches([urows])))  # pairs.parquet: desirable = chosen
    assert texts.column("chosen").to_pylist() == [e.completion if e.label else None for e in examples]
    assert texts.column("rejected").to_pylist() == [None if e.label else e.completion for e in examples]


@pytest.mark.parametrize("form", ["unpaired", "pairs"])
def test_a_store_written_in_small_blocks_holds_what_one_read_gives(form, tokenizer, tmp_path, monkeypatch):
    """Written block by block, the stores hold one read's examples, order, ids, token ids, texts and bad rows
    (with their lines). TRL's unpairing counts its blocks of pairs over the whole data, so pairs wait across
    blocks of rows, and a waiting pair's bad rows come a block after a later row's: listed in row order."""
    import prefcache.data.pairs as pair_data
    import prefcache.data.unpaired as unpaired

    monkeypatch.setattr(pair_data, "BLOCK_ROWS", 6)
    monkeypatch.setattr(unpaired, "UNPAIR_BLOCK", 4)  # TRL's 1000: of block 1's 5 valid pairs the 5th waits
    rows = preference_rows(29)
    rows[4] = {**rows[4], "prompt": "Question: " + "the cat sat " * 20}  # over 48 tokens: waits, then is bad
    if form == "unpaired":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 2 else r["rejected"],
                 "label": i % 3 != 0} for i, r in enumerate(rows)]
        rows[5] = {**rows[5], "label": "yes"}  # a bad row
    else:
        rows[5] = {**rows[5], "chosen": ""}  # a bad row
    rows[13] = dict(rows[2])  # an exact duplicate in a later block: dropped
    data = write_jsonl(tmp_path / f"{form}.jsonl", rows)
    items, bad, examples = load_unpaired(data, tokenizer, 48, on_bad_row="skip", unpair=True)
    view, stored_bad = unpaired_rows(data, tokenizer, 48, on_bad_row="skip", **opts(tokenizer, tmp_path))
    assert pa.ipc.open_file(view.path).num_record_batches >= 4  # really written in blocks
    assert list(view) == items and view.ids() == [i.id for i in items]
    assert len(items) == (29 - 3 if form == "unpaired" else 2 * (29 - 2) - 2)  # less bad rows, duplicate
    assert view.table.column("prompt").to_pylist() == [e.prompt for e in examples]
    assert view.table.column("completion").to_pylist() == [e.completion for e in examples]
    assert stored_bad == bad and [b.row for b in bad] == ([4, 5] if form == "unpaired" else [4, 4, 5])
    assert [b.line for b in bad] == [b.row + 1 for b in bad]
    if form == "pairs":
        pairs, pair_bad, _ = load_dataset_pairs(data, tokenizer, 48, on_bad_row="skip")
        view, stored_bad = pair_rows(data, tokenizer, 48, on_bad_row="skip", **opts(tokenizer, tmp_path))
        assert pa.ipc.open_file(view.path).num_record_batches >= 4
        assert list(view) == pairs and stored_bad == pair_bad and [b.row for b in pair_bad] == [4, 5]


def test_a_second_start_maps_the_store_and_tokenises_nothing(data, tokenizer, tmp_path):
    spy = SpyTokenizer(tokenizer)
    first, _ = pair_rows(data, spy, 48, on_bad_row="skip", **opts(tokenizer, tmp_path))
    assert spy.calls > 0
    spy.calls = 0
    second, bad = pair_rows(data, spy, 48, on_bad_row="skip", **opts(tokenizer, tmp_path))
    assert spy.calls == 0 and list(second) == list(first) and len(bad) == 1
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == sorted(
        [f"{second.path.rsplit('/', 1)[1]}", second.path.rsplit("/", 1)[1].replace(".arrow", ".json")])
    with pytest.raises(BadDataError, match="1 bad row"):  # the stored bad rows, under this start's policy
        pair_rows(data, spy, 48, on_bad_row="fail", **opts(tokenizer, tmp_path))
    assert spy.calls == 0


def test_what_the_token_ids_depend_on_makes_another_key(data, tokenizer, tmp_path):
    base = {"split": None, "data_config": None, "mapping": None, "tokenizer_key": tokenizer_key(tokenizer),
            "max_length": 48, "truncation": "keep_start"}
    key = store_name(store_key("pairs", data, **base))
    assert store_name(store_key("pairs", data, **base)) == key
    other_tok = {**base["tokenizer_key"], "tokenizer_fingerprint": "another"}
    other_template = {**base["tokenizer_key"], "chat_template_hash": "another"}
    changes = [{"max_length": 64}, {"truncation": "keep_end"}, {"tokenizer_key": other_tok},
               {"tokenizer_key": other_template}, {"mapping": RowMapping("prompt=question")},
               {"mapping": RowMapping(prompt_template="Q: {prompt}")}, {"split": "test"}]
    names = {store_name(store_key("pairs", data, **(base | c))) for c in changes}
    assert len(names) == len(changes) and key not in names
    assert store_name(store_key("unpaired", data, **base)) != key
    edited = write_jsonl(tmp_path / "e.jsonl", preference_rows(40))
    assert store_name(store_key("pairs", edited, **base)) != key  # other content (the bad row is gone)


def test_rank_0_writes_the_store_and_the_others_wait_for_it(data, tokenizer, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(store_mod, "barrier", lambda world: waits.append(world))
    monkeypatch.setattr(store_mod, "dist_info", lambda: (1, 2))
    spy = SpyTokenizer(tokenizer)
    with pytest.raises(RuntimeError, match="rank 0 did not write the data store"):  # rank 1 writes nothing
        pair_rows(data, spy, 48, on_bad_row="skip", **opts(tokenizer, tmp_path, world=2))
    assert spy.calls == 0 and waits == [2] and not (tmp_path / "stores").exists()
    monkeypatch.setattr(store_mod, "dist_info", lambda: (0, 2))
    rows, _ = pair_rows(data, spy, 48, on_bad_row="skip", **opts(tokenizer, tmp_path, world=2))
    assert spy.calls > 0 and waits == [2, 2]
    monkeypatch.setattr(store_mod, "dist_info", lambda: (1, 2))
    spy.calls = 0
    assert list(pair_rows(data, spy, 48, on_bad_row="skip", **opts(tokenizer, tmp_path, world=2))[0]) == list(rows)
    assert spy.calls == 0 and waits == [2, 2, 2]
    # rank 0 failing to write still reaches the barrier (the others would wait for ever), then raises
    monkeypatch.setattr(store_mod, "dist_info", lambda: (0, 2))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{not json\n')
    with pytest.raises(DataFormatError, match="broken.jsonl"):
        pair_rows(broken, spy, 48, **opts(tokenizer, tmp_path, world=2))
    assert waits == [2, 2, 2, 2] and not list((tmp_path / "stores").glob("*.part"))


def test_a_view_holds_arrow_and_numpy_only_mapped_not_copied(tmp_path, tokenizer):
    rows = preference_rows(2000)
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    view, _ = pair_rows(data, tokenizer, 64, **opts(tokenizer, tmp_path))
    before = pa.total_allocated_bytes()
    mapped, _ = read_store(Path(view.path), view.make)
    train = mapped.take(np.arange(0, len(mapped), 2))
    assert pa.total_allocated_bytes() - before < 4096  # the token ids stay in the mapped file
    assert mapped.table.nbytes > 100_000
    for v in (mapped, train):
        kept = {k: type(x) for k, x in vars(v).items()}
        assert set(kept.values()) <= {pa.Table, np.ndarray, type, str, type(None)}, kept
    assert train.rows.nbytes == 8 * len(train)  # a subset is its row numbers: 8 bytes an example


def _old_epoch_order(n, seed, epoch, rank, world, lengths=None, span=1):
    """epoch_order as it was on Python lists: the numpy one must give the same order, bit for bit."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    if lengths is not None:
        step = span * world
        mega = step * max(1, min(n // (4 * step), 50))
        perm = [i for s in range(0, n, mega) for i in sorted(perm[s : s + mega], key=lambda i: -lengths[i])]
    per_rank = math.ceil(n / world)
    perm += perm[: per_rank * world - n]
    return perm[rank::world]


@pytest.mark.parametrize("n,world,span", [(1, 1, 4), (3, 4, 1), (97, 2, 8), (1000, 3, 4), (5000, 1, 16)])
def test_epoch_order_from_a_lengths_column_is_the_order_of_before(n, world, span):
    lengths = np.random.default_rng(n).integers(5, 40, n)  # many ties: the sort must be stable
    for rank in range(world):
        for epoch in (0, 1):
            assert epoch_order(n, 3, epoch, rank, world, lengths, span) == _old_epoch_order(
                n, 3, epoch, rank, world, lengths.tolist(), span)
            assert epoch_order(n, 3, epoch, rank, world) == _old_epoch_order(n, 3, epoch, rank, world)


def test_an_empty_view_and_its_columns(tmp_path, tokenizer):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(4))
    view, _ = pair_rows(data, tokenizer, 64, **opts(tokenizer, tmp_path))
    empty = view.take([])
    assert isinstance(empty, TokenRows) and len(empty) == 0 and list(empty) == []
    assert empty.ids() == [] and empty.lengths().tolist() == []


def test_example_images_lists_each_image_once_with_its_position(tmp_path):
    """Image references of vision stores: one row per image (its position in the prompt), in store order; an id an
    earlier store already listed is left out; a row without images has none."""
    import pyarrow as pa

    from prefcache.core.schemas import TOKEN_VISION_PAIRS
    from prefcache.data.rows import TokenRows
    from prefcache.data.store import example_images
    from prefcache.data.vision_pairs import TokenizedVisionPair

    def store(name, rows):
        cols = {f.name: [] for f in TOKEN_VISION_PAIRS}
        for ident, images in rows:
            for k, v in {"id": ident, "prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3],
                         "chosen_truncated": False, "rejected_truncated": False, "row": 0, "tokens": 3, "prompt": "p",
                         "conversational": True, "chosen": "c", "rejected": "r",
                         "images": [{"sha256": h, "path": f"/img/{h}.png", "data": None} for h in images]}.items():
                cols[k].append(v)
        path = tmp_path / f"{name}.arrow"
        with pa.ipc.new_file(str(path), TOKEN_VISION_PAIRS) as w:
            w.write_batch(pa.RecordBatch.from_pydict(cols, schema=TOKEN_VISION_PAIRS))
        return TokenRows(pa.ipc.open_file(str(path)).read_all(), TokenizedVisionPair, path=str(path))

    first = store("a", [("p1", ["a1", "a2"]), ("p2", []), ("p3", ["c1"])])
    second = store("b", [("p3", ["c1"]), ("p4", ["d1", "d2", "d3"])])
    table = example_images([first, first.take([0]), second])
    assert table.to_pylist() == [
        {"id": i, "position": k, "sha256": h, "path": f"/img/{h}.png"}
        for i, k, h in [("p1", 0, "a1"), ("p1", 1, "a2"), ("p3", 0, "c1"), ("p4", 0, "d1"), ("p4", 1, "d2"),
                        ("p4", 2, "d3")]]
    assert first[0].images[1].sha256 == "a2"  # read back as ImageRefs
