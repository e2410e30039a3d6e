"""prefcache.analysis.views and the `sql` / `query` commands, on tiny Parquet fixtures with hand-worked answers.

Fixture (contract schemas), numbers chosen so every expected value below can be checked by hand:

cache `full`:  id  chosen  rejected  c_prefix r_prefix  prompt/chosen/rejected tokens  truncated (c, r)
               p1  -10     -12       -10      -12       5 / 10 / 10                    F F
               p2  -20     -15       -12      -15       6 / 20 / 10                    T F
               p3   -8     -16        -8      -10       4 /  8 / 16                    F F
               p4   -5      -5        -5       -5       3 /  5 /  5                    F F
               p5  -30      -6        -9       -6       7 / 30 /  6                    F T
cache `q4`:    p1 -10.5 -12 | p2 -20 -15.5 | p3 -8 -16 | p4 -4.75 -5.25 | p6 NaN -3 (2 / 4 / 4); no p5
run `run1`:    train margins, step 1: p1 0.0  p2 -0.2  p3 0.4  p4 0.2   (reward_chosen = margin / 2 = -reward_rejected)
                              step 2: p1 0.6  p2 -0.8  p3 1.0  p4 0.2
               eval at step 2: p5 -1.0; evals: arc_easy/acc base 0.50±0.03, step-000002 0.56±0.04 (and an older 0.40)
run `run2`:    steps only (no examples, evals or pairs).
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefcache.analysis import queries as named_queries
from prefcache.analysis import views as analysis
from prefcache.analysis.views import AnalysisError, connect

CACHE_COLS = ["id", "chosen_logps", "rejected_logps", "chosen_logps_prefix", "rejected_logps_prefix",
              "prompt_tokens", "chosen_tokens", "rejected_tokens", "chosen_truncated", "rejected_truncated"]
CACHE_TYPES = [pa.string()] + [pa.float64()] * 4 + [pa.int32()] * 3 + [pa.bool_()] * 2
TOKENS = {"p1": (5, 10, 10), "p2": (6, 20, 10), "p3": (4, 8, 16), "p4": (3, 5, 5), "p5": (7, 30, 6), "p6": (2, 4, 4)}
STEP_FLOATS = ["loss", "rewards_chosen", "rewards_rejected", "rewards_margins", "rewards_accuracies", "logps_chosen",
               "logps_rejected", "lr", "grad_norm", "tokens_per_s", "peak_mem_mb", "time_s"]
EXAMPLE_FLOATS = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                  "reward_chosen", "reward_rejected", "margin"]


def _table(rows: list[tuple], names: list[str], types: list[pa.DataType]) -> pa.Table:
    cols = list(zip(*rows, strict=True)) if rows else [[] for _ in names]
    return pa.table({n: pa.array(list(c), type=t) for n, c, t in zip(names, cols, types, strict=True)})


def write_cache(directory: Path, rows: list[tuple]) -> Path:
    directory.mkdir(parents=True)
    meta = {b"prefcache": json.dumps({"schema_version": 1, "model_name": "tiny"}).encode()}
    table = _table(rows, CACHE_COLS, CACHE_TYPES)
    pq.write_table(table.replace_schema_metadata(meta), directory / "part-r000-000000.parquet")
    return directory


def steps_table(rows: list[tuple]) -> pa.Table:
    """rows: (step, split, loss, accuracy, margin)."""
    full = [(s, s / 2.0, split, loss, m / 2, -m / 2, m, acc, -10.0, -12.0, 1e-5, 1.0, 100.0, 50.0, float(s))
            for s, split, loss, acc, m in rows]
    return _table(full, ["step", "epoch", "split", *STEP_FLOATS], [pa.int64(), pa.float64(), pa.string()] + [pa.float64()] * 12)


def examples_table(rows: list[tuple]) -> pa.Table:
    """rows: (id, step, split, margin); reward_chosen = margin / 2 = -reward_rejected."""
    full = [(i, s, split, None, -10.0, -12.0, -10.0, -12.0, m / 2, -m / 2, m, *TOKENS[i]) for i, s, split, m in rows]
    names = ["id", "step", "split", "checkpoint", *EXAMPLE_FLOATS, "prompt_tokens", "chosen_tokens", "rejected_tokens"]
    return _table(full, names, [pa.string(), pa.int64(), pa.string(), pa.string()] + [pa.float64()] * 7 + [pa.int32()] * 3)


def write_run(directory: Path, *, examples=True, evals=True, pairs=True) -> Path:
    (directory / "logs").mkdir(parents=True)
    (directory / "run.json").write_text(json.dumps({"model": "tiny", "loss": "sigmoid", "beta": 0.1}))
    pq.write_table(steps_table([(1, "train", 0.69, 0.5, 0.1), (2, "train", 0.6, 0.75, 0.25), (2, "eval", 0.65, 0.0, -1.0)]),
                   directory / "logs" / "steps-000000.parquet")
    if examples:  # two files, as a trainer appending per logging interval would write
        step1 = [("p1", 1, "train", 0.0), ("p2", 1, "train", -0.2), ("p3", 1, "train", 0.4), ("p4", 1, "train", 0.2)]
        step2 = [("p1", 2, "train", 0.6), ("p2", 2, "train", -0.8), ("p3", 2, "train", 1.0), ("p4", 2, "train", 0.2),
                 ("p5", 2, "eval", -1.0)]
        pq.write_table(examples_table(step1), directory / "logs" / "examples-000000.parquet")
        pq.write_table(examples_table(step2), directory / "logs" / "examples-000001.parquet")
    if evals:
        (directory / "evals").mkdir()
        t = [datetime(2025, 1, d, tzinfo=timezone.utc) for d in (1, 2, 3)]
        rows = [(None, None, "arc_easy", "acc", 0.50, 0.03, 100, t[0], "lm-eval"),
                ("step-000002", 2, "arc_easy", "acc", 0.40, 0.04, 100, t[1], "lm-eval"),  # superseded
                ("step-000002", 2, "arc_easy", "acc", 0.56, 0.04, 100, t[2], "lm-eval"),
                (None, None, "hellaswag", "acc_norm", 0.30, None, 50, t[0], "lm-eval"),
                ("step-000002", 2, "hellaswag", "acc_norm", 0.35, None, 50, t[2], "lm-eval")]
        names = ["checkpoint", "step", "task", "metric", "value", "stderr", "n", "time", "source"]
        types = [pa.string(), pa.int64(), pa.string(), pa.string(), pa.float64(), pa.float64(), pa.int64(),
                 pa.timestamp("us", tz="UTC"), pa.string()]
        pq.write_table(_table(rows, names, types), directory / "evals" / "lm-eval-000000.parquet")
    if pairs:
        rows = [(i, f"prompt {i}", f"good answer {i}", f"bad answer {i}") for i in ["p1", "p2", "p3", "p4", "p5"]]
        pq.write_table(_table(rows, ["id", "prompt", "chosen", "rejected"], [pa.string()] * 4), directory / "pairs.parquet")
    return directory


FULL = [("p1", -10.0, -12.0, -10.0, -12.0, *TOKENS["p1"], False, False),
        ("p2", -20.0, -15.0, -12.0, -15.0, *TOKENS["p2"], True, False),
        ("p3", -8.0, -16.0, -8.0, -10.0, *TOKENS["p3"], False, False),
        ("p4", -5.0, -5.0, -5.0, -5.0, *TOKENS["p4"], False, False),
        ("p5", -30.0, -6.0, -9.0, -6.0, *TOKENS["p5"], False, True)]
Q4 = [("p1", -10.5, -12.0, -10.5, -12.0, *TOKENS["p1"], False, False),
      ("p2", -20.0, -15.5, -12.0, -15.5, *TOKENS["p2"], True, False),
      ("p3", -8.0, -16.0, -8.0, -10.0, *TOKENS["p3"], False, False),
      ("p4", -4.75, -5.25, -4.75, -5.25, *TOKENS["p4"], False, False),
      ("p6", math.nan, -3.0, math.nan, -3.0, *TOKENS["p6"], False, False)]


@pytest.fixture
def fx(tmp_path):
    """Paths of the fixture: two caches and two runs."""
    return {
        "full": write_cache(tmp_path / "full", FULL),
        "q4": write_cache(tmp_path / "q4", Q4),
        "run1": write_run(tmp_path / "run1"),
        "run2": write_run(tmp_path / "run2", examples=False, evals=False, pairs=False),
    }


@pytest.fixture
def db(fx):
    with connect(caches=[fx["full"], fx["q4"]], runs=[fx["run1"], fx["run2"]]) as a:
        yield a


def rows(df) -> list[dict]:
    return df.to_dicts()


# ---------------------------------------------------------------------------------------------------------
# Views.

def test_views_have_the_contract_columns_and_a_source_column(db):
    for view, columns in analysis.VIEWS.items():
        described = db.sql(f"DESCRIBE {view}")
        names = described["column_name"].to_list()
        assert names[0] == analysis.SOURCE_COLUMN[view]
        assert names[1:] == [c for c, _ in columns]
        assert described["column_type"].to_list()[1:] == [t.replace("TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE") for _, t in columns]


def test_several_caches_and_runs_are_told_apart(db):
    assert rows(db.sql("SELECT cache_name, count(*) AS n FROM cache GROUP BY ALL ORDER BY 1")) == [
        {"cache_name": "full", "n": 5}, {"cache_name": "q4", "n": 5}]
    assert db.sql("SELECT DISTINCT run FROM steps ORDER BY 1")["run"].to_list() == ["run1", "run2"]
    assert db.views == {"cache": ["full", "q4"], "steps": ["run1", "run2"], "examples": ["run1"],
                        "evals": ["run1"], "pairs": ["run1"], "example_images": []}


def test_run_without_evals_gives_empty_typed_views(fx):
    with connect(runs=[fx["run2"]]) as a:
        for view in ("examples", "evals", "pairs"):
            assert len(a.sql(f"SELECT * FROM {view}")) == 0
        evals = a.sql("SELECT * FROM evals")
        assert evals.columns == ["run", *(c for c, _ in analysis.VIEWS["evals"])]
        assert str(evals.schema["value"]) == "Float64" and str(evals.schema["step"]) == "Int64"
        assert len(a.query("checkpoint_compare")) == 0


def test_missing_views_say_which_option_is_needed(fx):
    with connect(caches=[fx["full"]]) as a:
        with pytest.raises(AnalysisError, match=r"^view steps needs --run DIR"):
            a.sql("SELECT * FROM steps")
        with pytest.raises(AnalysisError, match=r"^unknown view nope; the views here are: cache"):
            a.sql("SELECT * FROM nope")
    with connect(runs=[fx["run1"]]) as a, pytest.raises(AnalysisError, match=r"^view cache needs --cache DIR"):
        a.query("length_stats")


def test_same_basename_is_disambiguated_and_names_can_be_chosen(tmp_path):
    a_dir = write_cache(tmp_path / "a" / "cache", FULL)
    b_dir = write_cache(tmp_path / "b" / "cache", Q4)
    with connect(caches=[a_dir, b_dir]) as a:
        assert a.sql("SELECT DISTINCT cache_name FROM cache ORDER BY 1")["cache_name"].to_list() == ["a/cache", "b/cache"]
    with connect(caches={"fp": a_dir, "nf4": b_dir}) as a:
        assert a.sql("SELECT DISTINCT cache_name FROM cache ORDER BY 1")["cache_name"].to_list() == ["fp", "nf4"]


def test_bad_directories_are_refused(tmp_path, fx):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="not a prefcache cache"):
        connect(caches=[tmp_path / "empty"])
    with pytest.raises(AnalysisError, match="not a run directory"):
        connect(runs=[tmp_path / "empty"])
    with pytest.raises(AnalysisError, match="not a directory"):
        connect(runs=[tmp_path / "missing"])
    with pytest.raises(AnalysisError, match="more than once"):
        connect(caches=[fx["full"], fx["full"]])


def test_extra_columns_pass_through_after_the_contract_ones(tmp_path):
    d = write_cache(tmp_path / "c", FULL[:1])
    table = pq.read_table(d / "part-r000-000000.parquet").append_column("note", pa.array(["x"]))
    pq.write_table(table, d / "part-r000-000001.parquet")
    with connect(caches=[d]) as a:
        df = a.sql("SELECT * FROM cache ORDER BY note NULLS FIRST")
        assert df.columns[-1] == "note" and df["note"].to_list() == [None, "x"]


# ---------------------------------------------------------------------------------------------------------
# Read-only.

@pytest.mark.parametrize("statement", [
    "DELETE FROM cache", "UPDATE cache SET chosen_logps = 0", "DROP VIEW cache", "CREATE TABLE t AS SELECT 1",
    "INSERT INTO cache SELECT * FROM cache", "COPY (SELECT * FROM cache) TO 'leak.csv'", "SET enable_external_access = true",
    "ATTACH 'other.db'", "PRAGMA version", "SELECT 1; SELECT 2",
])
def test_only_single_select_statements_run(db, statement, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AnalysisError, match=r"only read-only SELECT|expected one SQL statement"):
        db.sql(statement)
    assert not (tmp_path / "leak.csv").exists()
    assert len(db.sql("SELECT * FROM cache")) == 10


def test_files_outside_the_views_cannot_be_read_or_written(db, tmp_path):
    with pytest.raises(AnalysisError, match="disabled by configuration"):
        db.sql("SELECT * FROM read_csv('/etc/passwd')")
    # even past the statement check, the connection itself cannot write
    with pytest.raises(Exception, match="disabled by configuration"):
        db.con.execute(f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'")
    with pytest.raises(Exception, match="locked"):
        db.con.execute("SET enable_external_access = true")
    assert not (tmp_path / "x.csv").exists()


def test_bad_sql_and_parameters_give_one_line_errors(db):
    with pytest.raises(AnalysisError, match=r"^Parser Error: syntax error") as e:
        db.sql("SELEC 1")
    assert "\n" not in str(e.value)
    with pytest.raises(AnalysisError, match=r"^missing parameter a"):
        db.sql("SELECT $a")
    with pytest.raises(AnalysisError, match=r"parameter b is not used"):
        db.sql("SELECT $a AS a", a=1, b=2)
    assert db.sql("SELECT $a + 1 AS x", a=1)["x"].to_list() == [2]


def test_relation_is_lazy_duckdb(db):
    rel = db.relation("SELECT * FROM examples WHERE margin < $m", m=0)
    assert rel.aggregate("count(*) AS n").fetchall() == [(3,)]  # p2 at steps 1 and 2, p5 in eval


# ---------------------------------------------------------------------------------------------------------
# Named queries: files, headers, parameters.

def test_every_query_file_declares_exactly_the_parameters_it_uses():
    queries = named_queries.list_queries()
    assert len(queries) >= 10
    for q in queries:
        assert q.path.stem == q.name and q.description
        used = set(re.findall(r"\$(\w+)", q.sql))
        assert used == {p.name for p in q.params}, q.name
        for p in q.params:
            assert p.description, (q.name, p.name)


def test_header_parsing_types_defaults(tmp_path):
    f = tmp_path / "x.sql"
    f.write_text("-- name: x\n-- description: d\n-- param: a 3 an int\n-- param: b 0.5 a float\n"
                 "-- param: c 'two words' a str\n-- param: d required needed\n-- a comment\nSELECT $a, $b, $c, $d\n")
    q = named_queries.parse_query(f)
    assert [(p.name, p.default, p.type) for p in q.params] == [("a", 3, int), ("b", 0.5, float), ("c", "two words", str),
                                                               ("d", None, str)]
    assert q.bind({"a": "7", "d": "x"}) == {"a": 7, "b": 0.5, "c": "two words", "d": "x"}
    with pytest.raises(AnalysisError, match="parameter a expects int"):
        q.bind({"a": "seven", "d": "x"})
    with pytest.raises(AnalysisError, match="needs parameter d"):
        q.bind({})
    with pytest.raises(AnalysisError, match="has no parameter z"):
        q.bind({"d": 1, "z": 1})


def test_unknown_query(db):
    with pytest.raises(AnalysisError, match="no named query 'nope'"):
        db.query("nope")


def test_queries_are_found_in_the_package_first(tmp_path):
    pkg = tmp_path / "prefcache"
    (pkg / "sql").mkdir(parents=True)
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "a.sql").write_text("-- name: a\nSELECT 1\n")
    assert named_queries.sql_dir(pkg) == tmp_path / "sql"  # an empty package folder does not count
    (pkg / "sql" / "a.sql").write_text("-- name: a\nSELECT 1\n")
    assert named_queries.sql_dir(pkg) == pkg / "sql"
    (tmp_path / "sql" / "a.sql").unlink()
    (pkg / "sql" / "a.sql").unlink()
    with pytest.raises(AnalysisError, match="no named queries found"):
        named_queries.sql_dir(pkg)


# ---------------------------------------------------------------------------------------------------------
# Each named query against the hand-worked fixture (see the module docstring).

def test_reward_summary(db):
    df = db.query("reward_summary", split="train")
    got = [(r["run"], r["step"], r["n"], r["loss"]) for r in rows(df)]
    assert got == [("run1", 1, 4, 0.69), ("run1", 2, 4, 0.6)]
    s1, s2 = rows(df)
    assert s1["reward_chosen"] == pytest.approx(0.05) and s1["reward_rejected"] == pytest.approx(-0.05)
    assert s1["margin_mean"] == pytest.approx(0.1) and s1["accuracy"] == 0.5  # the tie at 0.0 is not a win
    assert s1["margin_median"] == pytest.approx(0.1)
    assert s2["margin_mean"] == pytest.approx(0.25) and s2["accuracy"] == 0.75
    assert s2["margin_std"] == pytest.approx(math.sqrt(sum((m - 0.25) ** 2 for m in (0.6, -0.8, 1.0, 0.2)) / 3))
    every = db.query("reward_summary")
    assert rows(every)[0]["split"] == "eval" and rows(every)[0]["margin_mean"] == -1.0


def test_training_curves(db):
    df = db.query("training_curves", split="eval")
    assert [(r["run"], r["step"], r["loss"]) for r in rows(df)] == [("run1", 2, 0.65), ("run2", 2, 0.65)]
    assert len(db.query("training_curves")) == 6
    assert df.columns[-1] == "padding_share"  # NULL for logs written before the column existed


def test_margin_histogram(db):
    df = db.query("margin_histogram", bins=4)  # step 2 margins -0.8, 0.2, 0.6, 1.0
    assert df["n"].to_list() == [1, 0, 1, 2] and df["step"].to_list() == [2] * 4
    assert df["bucket_lo"].to_list() == pytest.approx([-0.8, -0.35, 0.1, 0.55])
    assert df["bucket_hi"].to_list()[-1] == pytest.approx(1.0)
    assert df["fraction"].to_list() == [0.25, 0.0, 0.25, 0.5]
    fixed = db.query("margin_histogram", step="first", bins=2, lo="-1", hi="1")  # -0.2 | 0.0, 0.2, 0.4
    assert fixed["n"].to_list() == [1, 3] and fixed["step"].to_list() == [1, 1]
    assert db.query("margin_histogram", step="all", bins=1)["n"].to_list() == [8]
    assert db.query("margin_histogram", step="1", bins=1)["n"].to_list() == [4]
    with pytest.raises(AnalysisError, match="step must be first, last, all or a step number, not soon"):
        db.query("margin_histogram", step="soon")
    with pytest.raises(AnalysisError, match="bins must be at least 1"):
        db.query("margin_histogram", bins=0)


def test_length_bias(db):
    df = db.query("length_bias", width=10)  # step 2 deltas: p1 0, p2 10, p3 -8, p4 0
    assert [(r["bucket_lo"], r["bucket_hi"], r["n"]) for r in rows(df)] == [(-10, 0, 1), (0, 10, 2), (10, 20, 1)]
    assert df["accuracy"].to_list() == [1.0, 1.0, 0.0]
    assert df["margin_mean"].to_list() == pytest.approx([1.0, 0.4, -0.8])
    assert df["share"].to_list() == [0.25, 0.5, 0.25]
    total = db.query("length_bias", width=100, length="total", step="first")  # one bucket, step 1 accuracy 0.5
    assert total["accuracy"].to_list() == [0.5] and total["step"].to_list() == [1] and total["n"].to_list() == [4]
    with pytest.raises(AnalysisError, match="length must be delta, chosen, rejected or total"):
        db.query("length_bias", length="height")


def test_length_stats(db):
    full, q4 = rows(db.query("length_stats"))
    assert full["cache_name"] == "full" and full["n"] == 5
    assert full["prompt_mean"] == 5.0 and full["chosen_mean"] == pytest.approx(14.6) and full["rejected_mean"] == pytest.approx(9.4)
    assert full["chosen_median"] == 10 and full["rejected_median"] == 10 and full["chosen_max"] == 30
    assert full["delta_mean"] == pytest.approx(5.2)
    assert (full["chosen_longer"], full["rejected_longer"], full["same_length"]) == (0.4, 0.2, 0.4)
    assert (full["chosen_truncated"], full["rejected_truncated"]) == (0.2, 0.2)
    # chosen log-prob per token: -1, -1, -1, -1, -1 -> -1
    assert full["chosen_logps_per_token"] == pytest.approx(-1.0)
    assert q4["n"] == 5 and q4["cache_name"] == "q4"


def test_hardest_pairs(db):
    df = db.query("hardest_pairs", limit=2)
    assert df["id"].to_list() == ["p2", "p4"] and df["margin"].to_list() == [-0.8, 0.2]
    assert df["chosen"].to_list() == ["good answer p2", "good answer p4"] and df["prompt"][0] == "prompt p2"
    ev = db.query("hardest_pairs", split="eval", limit=5)
    assert ev["id"].to_list() == ["p5"] and ev["rejected"].to_list() == ["bad answer p5"]


def test_reward_drift(db):
    df = db.query("reward_drift")
    assert df["id"].to_list() == ["p2", "p4", "p1", "p3"]
    assert df["margin_drift"].to_list() == pytest.approx([-0.6, 0.0, 0.6, 0.6])
    assert df["reward_chosen_drift"].to_list() == pytest.approx([-0.3, 0.0, 0.3, 0.3])
    assert df["flipped"].to_list() == [False, False, True, False]  # p1: a tie (0.0) became a win
    assert set(df["step_a"]) == {1} and set(df["step_b"]) == {2}
    assert db.query("reward_drift", limit=1)["id"].to_list() == ["p2"]
    same = db.query("reward_drift", step_a="2", step_b="last")
    assert same["margin_drift"].to_list() == [0.0] * 4


def test_checkpoint_compare(db):
    df = db.query("checkpoint_compare")
    arc = [r for r in rows(df) if r["task"] == "arc_easy"]
    assert [(r["checkpoint"], r["value"]) for r in arc] == [(None, 0.5), ("step-000002", 0.56)]  # older 0.40 superseded
    assert arc[1]["baseline"] == "base" and arc[1]["delta"] == pytest.approx(0.06)
    assert arc[1]["z"] == pytest.approx(0.06 / 0.05)  # sqrt(0.03^2 + 0.04^2) = 0.05
    hs = [r for r in rows(df) if r["task"] == "hellaswag"]
    assert hs[1]["delta"] == pytest.approx(0.05) and hs[1]["z"] is None  # no stderr, no z
    against = db.query("checkpoint_compare", task="arc_easy", baseline="step-000002")
    assert against["delta"].to_list() == pytest.approx([-0.06, 0.0])


def test_cache_coverage(db):
    full, q4 = rows(db.query("cache_coverage"))  # 6 ids in all: p1-p5 in full, p1-p4 and p6 in q4
    assert (full["rows"], full["ids"], full["duplicate_ids"], full["missing_ids"]) == (5, 5, 0, 1)
    assert full["coverage"] == pytest.approx(5 / 6) and q4["coverage"] == pytest.approx(5 / 6)
    assert (full["nan_rows"], q4["nan_rows"]) == (0, 1)
    assert (full["positive_logps"], q4["positive_logps"], full["bad_prefix"], q4["bad_prefix"]) == (0, 0, 0, 0)
    assert (full["truncated"], q4["truncated"]) == (2, 1)


def test_cache_coverage_flags_impossible_values(tmp_path):
    bad = [("x1", 1.0, -2.0, 1.0, -2.0, 1, 2, 2, False, False),   # a positive log-prob
           ("x2", -9.0, -2.0, -10.0, -2.0, 1, 2, 2, False, False),  # prefix below the full sum
           ("x2", -9.0, -2.0, -9.0, -2.0, 1, 0, 2, False, False),   # duplicate id, empty completion
           ("x3", math.nan, -2.0, math.nan, -2.0, 1, 2, 2, False, False)]  # NaN: outside the Parquet min/max
    with connect(caches=[write_cache(tmp_path / "bad", bad)]) as a:
        r = rows(a.query("cache_coverage"))[0]
    assert (r["positive_logps"], r["bad_prefix"], r["duplicate_ids"], r["empty_completions"]) == (1, 1, 1, 1)
    assert r["nan_rows"] == 1  # DuckDB's statistics propagation would fold isnan() to false here


def test_quant_audit(db):
    (r,) = rows(db.query("quant_audit", cache_a="full", cache_b="q4"))
    assert (r["n_a"], r["n_b"], r["n_common"], r["only_a"], r["only_b"], r["token_mismatch"]) == (5, 5, 4, 1, 1, 0)
    # chosen diffs -0.5, 0, 0, 0.25; rejected diffs 0, -0.5, 0, -0.25; margin diffs -0.5, 0.5, 0, 0.5
    assert r["chosen_bias"] == pytest.approx(-0.0625) and r["chosen_mae"] == pytest.approx(0.1875)
    assert r["rejected_bias"] == pytest.approx(-0.1875) and r["rejected_mae"] == pytest.approx(0.1875)
    assert r["max_abs_diff"] == 0.5 and r["per_token_mae"] == pytest.approx(1.5 / 84)
    assert r["margin_bias"] == pytest.approx(0.125) and r["margin_mae"] == pytest.approx(0.375)
    assert r["sign_agreement"] == 0.75  # p4: 0 (not a win) became 0.5
    assert r["logit_shift_mae"] == pytest.approx(0.0375) and r["logit_shift_max"] == pytest.approx(0.05)
    assert db.query("quant_audit", cache_a="full", cache_b="q4", beta="1")["logit_shift_max"][0] == pytest.approx(0.5)
    with pytest.raises(AnalysisError, match="cache_b fp16 is not a cache_name here"):
        db.query("quant_audit", cache_a="full", cache_b="fp16")
    with pytest.raises(AnalysisError, match="needs parameter cache_a"):
        db.query("quant_audit")


def test_quant_audit_pairs(db):
    df = db.query("quant_audit_pairs", cache_a="full", cache_b="q4")
    assert df["id"].to_list() == ["p1", "p2", "p4", "p3"]  # |margin diff| 0.5, 0.5, 0.5, 0
    assert df["margin_diff"].to_list() == pytest.approx([-0.5, 0.5, 0.5, 0.0])
    assert df["sign_flip"].to_list() == [False, False, True, False]
    assert df["tokens_match"].all() and df["logit_shift"][0] == pytest.approx(-0.05)
    assert db.query("quant_audit_pairs", cache_a="full", cache_b="q4", limit=1)["id"].to_list() == ["p1"]


def test_every_named_query_has_a_test():
    missing = [q.name for q in named_queries.list_queries() if f"test_{q.name}" not in globals()]
    assert not missing, f"write a test_<name> for each sql/*.sql: {missing}"


# ---------------------------------------------------------------------------------------------------------
# The CLI: `prefcache sql` and `prefcache query` (invoked directly; the lead registers them on `main`).

from click.testing import CliRunner  # noqa: E402

from prefcache.cli.sql import query_cmd, sql_cmd  # noqa: E402


def invoke(cmd, *args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def test_cli_sql_prints_a_table(fx):
    r = invoke(sql_cmd, "SELECT cache_name, count(*) AS n FROM cache GROUP BY ALL ORDER BY 1",
               "--cache", fx["full"], "--cache", fx["q4"])
    assert r.exit_code == 0, r.output
    assert "cache_name" in r.output and "full" in r.output and "q4" in r.output and "(2 rows)" in r.output


def test_cli_sql_formats_and_output(fx, tmp_path):
    q = "SELECT id, margin FROM examples WHERE split = $split ORDER BY step, id"
    r = invoke(sql_cmd, q, "--run", fx["run1"], "-p", "split=eval", "--format", "json")
    assert r.exit_code == 0 and json.loads(r.output) == [{"id": "p5", "margin": -1.0}]
    r = invoke(sql_cmd, q, "--run", fx["run1"], "-p", "split=train", "-f", "csv")
    assert r.output.splitlines()[:2] == ["id,margin", "p1,0.0"]
    r = invoke(sql_cmd, q, "--run", fx["run1"], "-p", "split=train", "-f", "parquet")
    assert r.exit_code == 1 and "needs --output" in r.output
    out = tmp_path / "m.parquet"
    r = invoke(sql_cmd, q, "--run", fx["run1"], "-p", "split=train", "-f", "parquet", "-o", out)
    assert r.exit_code == 0 and pq.read_table(out).num_rows == 8
    r = invoke(sql_cmd, "SELECT * FROM range(10)", "--max-rows", "3")
    assert "(3 rows shown, more not fetched" in r.output and r.output.count("│") > 0
    r = invoke(sql_cmd, "SELECT * FROM range(3)", "--max-rows", "3")
    assert "(3 rows)" in r.output
    r = invoke(sql_cmd, "SELECT [1.5, 2.0]::FLOAT[] AS toks, TIMESTAMPTZ '2025-01-02 03:04:05+00' AS t", "-f", "csv")
    assert r.exit_code == 0 and r.output.splitlines()[1].startswith('"[1.5, 2.0]",2025-01-02T03:04:05')
    r = invoke(sql_cmd, "SELECT [1.5]::FLOAT[] AS toks, 'nan'::DOUBLE AS x", "-f", "json")
    assert json.loads(r.output) == [{"toks": [1.5], "x": None}]


@pytest.mark.parametrize("args, message", [
    (["SELEC 1"], "Error: Parser Error: syntax error"),
    (["SELECT * FROM nope", "--cache", "{full}"], "Error: unknown view nope"),
    (["SELECT * FROM steps", "--cache", "{full}"], "Error: view steps needs --run DIR"),
    (["DELETE FROM cache", "--cache", "{full}"], "Error: only read-only SELECT queries are allowed; this is a DELETE"),
    (["COPY (SELECT 1) TO 'x.csv'"], "Error: only read-only SELECT queries are allowed; this is a COPY"),
    (["CREATE TABLE t (a INT)"], "Error: only read-only SELECT queries are allowed; this is a CREATE"),
    (["SELECT $a"], "Error: missing parameter a"),
    (["SELECT 1", "-p", "novalue"], "Error: --param wants NAME=VALUE"),
])
def test_cli_sql_errors_are_one_line(fx, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = invoke(sql_cmd, *(a.format(**fx) for a in args))
    assert r.exit_code == 1 and r.output.startswith(message), r.output
    assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not (tmp_path / "x.csv").exists()


def test_cli_query_list_and_run(fx):
    r = invoke(query_cmd, "--list")
    assert r.exit_code == 0
    for q in named_queries.list_queries():
        assert q.name in r.output
    assert "--param cache_a=STR" in r.output and "(required)" in r.output
    r = invoke(query_cmd, "margin_histogram", "--run", fx["run1"], "--param", "bins=4", "-f", "csv")
    assert r.exit_code == 0 and [line.split(",")[5] for line in r.output.splitlines()[1:]] == ["1", "0", "1", "2"]
    r = invoke(query_cmd, "quant_audit", "--cache", fx["full"], "--cache", fx["q4"], "-p", "cache_a=full", "-p", "cache_b=q4",
               "-f", "json")
    assert r.exit_code == 0 and json.loads(r.output)[0]["n_common"] == 4
    assert "-- name: length_bias" in invoke(query_cmd, "length_bias", "--show-sql").output


@pytest.mark.parametrize("args, message", [
    (["nope"], "Error: no named query 'nope'"),
    (["quant_audit", "--cache", "{full}"], "Error: query quant_audit needs parameter cache_a"),
    (["margin_histogram", "--run", "{run1}", "-p", "bins=many"], "Error: parameter bins expects int, got 'many'"),
    (["margin_histogram", "--run", "{run1}", "-p", "colour=red"], "Error: query margin_histogram has no parameter colour"),
    (["margin_histogram", "--run", "{run1}", "-p", "step=soon"], "Error: step must be first, last, all or a step number"),
    (["length_stats", "--run", "{run1}"], "Error: view cache needs --cache DIR"),
    ([], "Error: give a query NAME, or --list"),
])
def test_cli_query_errors_are_one_line(fx, args, message):
    r = invoke(query_cmd, *(a.format(**fx) for a in args))
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert "Traceback" not in r.output


def test_hardest_pairs_widest_first(db):
    widest = db.query("hardest_pairs", limit=2, order="widest")
    hardest = db.query("hardest_pairs", limit=2)
    assert widest["margin"].to_list() == sorted(widest["margin"].to_list(), reverse=True)
    assert min(widest["margin"]) > max(hardest["margin"])
    with pytest.raises(AnalysisError, match="order must be hardest or widest"):
        db.query("hardest_pairs", order="easiest")
