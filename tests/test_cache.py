"""Shard writing, metadata, compatibility checks and verification of the cache format."""

from __future__ import annotations

import json

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import CACHE_META, cache_rows

from prefcache.cache.store import (
    COMPAT_KEYS,
    CacheError,
    CacheWriter,
    differences,
    existing_ids,
    read_cache,
    read_metadata,
    shard_paths,
    summary,
    verify,
)


def test_shards_are_atomic_numbered_and_readable_by_any_parquet_reader(tmp_path):
    w = CacheWriter(tmp_path, CACHE_META)
    w.write(cache_rows(["a", "b"]))
    w.write(cache_rows(["c"]))
    names = [p.name for p in shard_paths(tmp_path)]
    assert [n[:16] for n in names] == ["part-r000-000000", "part-r000-000001"]
    assert len({n[17:25] for n in names}) == 1  # one nonce per pass
    assert not list(tmp_path.glob(".tmp-*"))
    assert read_metadata(tmp_path)["model_fingerprint"] == "m"
    assert sorted(read_cache(tmp_path).column("id").to_pylist()) == ["a", "b", "c"]
    glob = str(tmp_path / "part-r*.parquet")
    assert pl.read_parquet(glob).height == 3
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == 3
    assert existing_ids(tmp_path) == {"a", "b", "c"}
    types = pq.read_schema(shard_paths(tmp_path)[0])
    assert str(types.field("chosen_logps").type) == "double" and str(types.field("prompt_tokens").type) == "int32"


def test_new_writer_continues_numbering_and_removes_stale_temp_files(tmp_path):
    CacheWriter(tmp_path, CACHE_META).write(cache_rows(["a"]))
    (tmp_path / ".tmp-r000-crashed.parquet").write_bytes(b"half a file")
    w = CacheWriter(tmp_path, CACHE_META)
    assert not list(tmp_path.glob(".tmp-*"))
    assert w.write(cache_rows(["b"])).name.startswith("part-r000-000001-")
    assert CacheWriter(tmp_path, CACHE_META, rank=1).write(cache_rows(["c"])).name.startswith("part-r001-000000-")


def test_two_writers_never_collide_even_without_the_lock(tmp_path):
    a, b = CacheWriter(tmp_path, CACHE_META), CacheWriter(tmp_path, CACHE_META)
    a.write(cache_rows(["a"]))
    b.write(cache_rows(["b"]))  # same rank, same sequence number: another nonce
    assert existing_ids(tmp_path) == {"a", "b"} and len(shard_paths(tmp_path)) == 2


def test_shards_without_a_nonce_of_older_caches_are_read(tmp_path):
    CacheWriter(tmp_path, CACHE_META).write(cache_rows(["a"]))
    old = shard_paths(tmp_path)[0]
    old.rename(tmp_path / "part-r000-000000.parquet")
    assert existing_ids(tmp_path) == {"a"}
    assert CacheWriter(tmp_path, CACHE_META).write(cache_rows(["b"])).name.startswith("part-r000-000001-")


def test_a_failed_shard_write_leaves_no_partial_file_and_names_it(tmp_path, monkeypatch):
    from prefcache.core.atomic import WriteError

    w = CacheWriter(tmp_path, CACHE_META)
    w.write(cache_rows(["a"]))

    def full_disk(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(WriteError, match=r"cannot write .*part-r000-000001-\w+\.parquet: no space left on device "
                                         r"\(1,000 bytes written"):
        w.write(cache_rows(["b"]))
    assert [p.name for p in tmp_path.iterdir()] == [shard_paths(tmp_path)[0].name]


def test_per_token_columns_are_lists(tmp_path):
    CacheWriter(tmp_path, {**CACHE_META, "per_token": True}).write(cache_rows(["a"], per_token=True))
    t = read_cache(tmp_path)
    assert t.column("rejected_token_logps").to_pylist() == [[-0.5] * 4]


def test_differences_name_each_key():
    other = {**CACHE_META, "max_length": 128, "quantization": "4bit"}
    diff = differences(CACHE_META, other)
    assert diff == ["max_length: cache has 64, asked for 128", "quantization: cache has 'fp32', asked for '4bit'"]
    assert set(COMPAT_KEYS) >= {"model_fingerprint", "tokenizer_fingerprint", "chat_template_hash", "max_length",
                                "truncation", "quantization", "schema_version"}


def test_verify_healthy_cache_and_coverage(tmp_path):
    CacheWriter(tmp_path, CACHE_META).write(cache_rows(["a", "b"]))
    assert verify(tmp_path, expected_ids=["a", "b"]) == []
    problems = verify(tmp_path, expected_ids=["a", "b", "x", "y"])
    assert len(problems) == 1 and "2 of 4 ids" in problems[0] and "x" in problems[0]
    assert verify(tmp_path, expected_ids=["a", "b", "x"], skipped_ids={"x"}) == []


def test_verify_finds_duplicates_nan_and_damaged_shards(tmp_path):
    w = CacheWriter(tmp_path, CACHE_META)
    w.write(cache_rows(["a", "b"]))
    w.write(cache_rows(["b"]))
    w.write(cache_rows(["n"], chosen=float("nan")))
    (tmp_path / "part-r000-000009.parquet").write_bytes(b"not parquet")
    text = "\n".join(verify(tmp_path))
    assert "1 duplicate ids" in text and "b (" in text
    assert "id n has chosen_logps = nan" in text
    assert "part-r000-000009.parquet: unreadable" in text


def test_verify_finds_shards_with_different_metadata(tmp_path):
    CacheWriter(tmp_path, CACHE_META).write(cache_rows(["a"]))
    CacheWriter(tmp_path, {**CACHE_META, "max_length": 99}, rank=1).write(cache_rows(["b"]))
    assert any("max_length: cache has 64, asked for 99" in p for p in verify(tmp_path))


def test_summary_and_manifest(tmp_path):
    w = CacheWriter(tmp_path, CACHE_META)
    w.write(cache_rows(["a", "b", "c"], chosen=-1.0, rejected=-3.0))
    w.write_manifest()
    s = summary(tmp_path)
    assert s["rows"] == 3 and s["unique_ids"] == 3 and s["shards"] == 1
    assert s["columns"]["chosen_logps"]["mean"] == pytest.approx(-1.0)
    assert s["rejected_truncated_frac"] == 1.0 and s["ref_prefers_chosen_frac"] == 1.0
    assert json.loads((tmp_path / "manifest.json").read_text())["metadata"] == CACHE_META


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="not a prefcache cache"):
        read_metadata(tmp_path)


def test_shards_and_manifest_are_readable_by_others(tmp_path):
    import stat

    from prefcache.cache.store import CacheWriter

    writer = CacheWriter(tmp_path / "c", {"per_token": False})
    shard = writer.write({"id": ["a"], "chosen_logps": [-1.0], "rejected_logps": [-2.0], "chosen_logps_prefix": [-1.0],
                          "rejected_logps_prefix": [-2.0], "prompt_tokens": [1],
                          "chosen_tokens": [1], "rejected_tokens": [1], "chosen_truncated": [False],
                          "rejected_truncated": [False]})
    writer.write_manifest()
    for path in (shard, tmp_path / "c" / "manifest.json"):
        assert path.stat().st_mode & stat.S_IROTH, path


def test_temporaries_of_a_killed_pass_are_removed_by_the_next_one_of_their_rank(tmp_path):
    from prefcache.cache.store import remove_temporaries

    names = [".tmp-r000-a.part", ".tmp-manifest-b.part", ".tmp-config-c.part", ".tmp-bad_rows-d.part",
             ".tmp-r001-e.part"]
    for name in names:
        (tmp_path / name).write_text("half")
    remove_temporaries(tmp_path, rank=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[:4])
    remove_temporaries(tmp_path, rank=0)
    assert list(tmp_path.iterdir()) == []
