"""schemas: each table declared once; every writer's output reads back through its SQL view whole.

A column renamed in a writer but not in a view (or the other way round) fails here, instead of becoming
a silently NULL column in ``prefcache sql``.
"""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from prefcache.analysis.views import SOURCE_COLUMN, VIEWS, connect
from prefcache.cache.lookup import ReferenceTable
from prefcache.cache.store import CacheWriter, read_cache
from prefcache.core import schemas
from prefcache.core.schemas import duckdb_type, example_columns, view_columns
from prefcache.data.pairs import Example, TokenizedPair
from prefcache.evaluation.checkpoints import evals_frame, write_parquet
from prefcache.reference.shards import shard_columns
from prefcache.training.log import RunLog, write_example_images, write_pairs

PAIRS = [TokenizedPair("a", [1, 2], [3, 4, 5], [6], False, True), TokenizedPair("b", [1], [7], [8, 9], True, False)]


def test_duckdb_types_of_arrow_types():
    assert duckdb_type(pa.list_(pa.float32())) == "FLOAT[]"
    assert duckdb_type(pa.timestamp("us", tz="UTC")) == "TIMESTAMP WITH TIME ZONE"
    assert view_columns(schemas.PAIRS) == [("id", "VARCHAR"), ("prompt", "VARCHAR"), ("chosen", "VARCHAR"),
                                           ("rejected", "VARCHAR")]
    with pytest.raises(KeyError):
        duckdb_type(pa.large_string())  # polars' string type is not a contract type: writers cast to string


def test_views_are_the_schemas():
    assert VIEWS == {"cache": view_columns(schemas.cache_schema(per_token=True)), "steps": view_columns(schemas.STEPS),
                     "examples": view_columns(schemas.EXAMPLES), "evals": view_columns(schemas.EVALS),
                     "pairs": view_columns(schemas.PAIRS), "example_images": view_columns(schemas.EXAMPLE_IMAGES)}


def test_example_columns_are_the_examples_schema_less_its_keys():
    cols = example_columns(PAIRS, [-1.0, -2.0], [-3.0, -4.0], None, None, [0.5, 0.25], [0.0, 1.0])
    assert tuple(cols) == schemas.EXAMPLE_COLUMNS
    assert set(schemas.EXAMPLES.names) - set(cols) == {"step", "split", "checkpoint"}
    assert cols["margin"] == [0.5, -0.75] and cols["ref_chosen_logps"] == [None, None]
    assert (cols["prompt_tokens"], cols["chosen_tokens"], cols["rejected_tokens"]) == ([2, 1], [3, 1], [1, 2])


def test_reference_table_reads_the_cache_numbers():
    assert ReferenceTable.COLUMNS == ("chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix",
                                      "prompt_tokens", "chosen_tokens", "rejected_tokens")


@pytest.fixture
def written(tmp_path):
    """One table of each kind, written by the code that writes it in a real run."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    token_logps = {((), tuple(p.prompt_ids + c)): np.full(len(c), -0.5, dtype=np.float32)
                   for p in PAIRS for c in (p.chosen_ids, p.rejected_ids)}
    CacheWriter(cache, {"per_token": True}).write(shard_columns(PAIRS, token_logps, per_token=True))
    log = RunLog(run)
    log.add_step({c: (1 if c == "step" else "train" if c == "split" else 0.5) for c in schemas.STEPS.names})
    log.add_examples(example_columns(PAIRS, [-1.0, -2.0], [-3.0, -4.0], [-1.0, -2.0], [-3.0, -4.0], [0.0, 0.1],
                                     [0.0, 0.2]), step=1, split="train", checkpoint="step-000001")
    log.flush()
    frame = evals_frame([{"checkpoint": "step-000001", "step": 1, "task": "preference", "metric": "acc",
                           "value": 0.5, "stderr": 0.1, "n": 2, "time": datetime.now(timezone.utc), "source": "score"}])
    write_parquet(frame, schemas.EVALS, run / "evals", "score", "step-000001")
    write_pairs(run / "pairs.parquet", [Example(p.id, i, "p", "c", "r") for i, p in enumerate(PAIRS)])
    images = pa.table({"id": ["a", "a"], "position": [0, 1], "sha256": ["e3b0", "5d41"], "path": ["x.png", "y.png"]})
    write_example_images(run / "logs", images.cast(schemas.EXAMPLE_IMAGES), "train")
    return cache, run


def test_every_writer_reads_back_through_its_view_with_no_null_column(written):
    cache, run = written
    assert read_cache(cache).schema == schemas.cache_schema(per_token=True)
    with connect(caches=[cache], runs=[run]) as a:
        for view, columns in VIEWS.items():
            described = a.sql(f"DESCRIBE {view}")
            got = list(zip(described["column_name"], described["column_type"], strict=True))
            assert got == [(SOURCE_COLUMN[view], "VARCHAR"), *columns], f"{view}: a column no schema declares"
            nulls = a.sql(f"SELECT {', '.join(f'count(*) - count({c}) AS {c}' for c, _ in columns)}, "
                          f"count(*) AS rows_ FROM {view}").row(0, named=True)
            assert nulls.pop("rows_") > 0, view
            assert {c: k for c, k in nulls.items() if k} == {}, f"{view}: columns the writer left empty"
