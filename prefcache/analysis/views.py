"""SQL over reference caches and run directories: DuckDB views plus the named queries in ``sql/*.sql``.

``connect(caches=[...], runs=[...])`` opens an in-memory DuckDB and exposes what it was given as
views with fixed names and columns (the writers' schemas, :mod:`prefcache.core.schemas`; see :data:`VIEWS`), each with one
extra leading column saying where a row came from (``cache_name`` or ``run``: the directory's
basename, lengthened with parent folders when two would clash)::

    cache     reference log-probs, from CACHE/part-r*.parquet
    steps     per-step training / eval logs, from RUN/logs/steps-*.parquet
    examples  per-example rewards over training, from RUN/logs/examples-*.parquet
    evals     evaluation results, from RUN/evals/*.parquet
    pairs     the rendered texts, from RUN/pairs.parquet
    example_images  a vision run's images per example (id, position, sha256, path), from
              RUN/logs/example_images-*.parquet; each row once (train and every score write them)

A view whose files are missing in every given run is still created, empty but typed; a view that
needs a run (or a cache) when none was given does not exist, and a query touching it fails with a
message saying which option is missing.

Everything is read-only: only single SELECT statements are run (checked with
``duckdb.extract_statements``), and after the views are built the connection loses file-system
access except for reading the given Parquet files (``allowed_paths``, ``enable_external_access``,
then ``lock_configuration``), so ``COPY ... TO`` or ``read_csv('/etc/passwd')`` cannot work even if
the statement check were bypassed. Parameters are always bound (``$name``), never pasted into SQL.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import duckdb
import polars as pl

from prefcache.analysis.queries import AnalysisError, get_query
from prefcache.cache.store import shard_paths
from prefcache.core import schemas
from prefcache.core.schemas import view_columns

# view -> [(column, DuckDB type)], from the Arrow schemas the writers use (one declaration: prefcache.core.schemas).
VIEWS: dict[str, list[tuple[str, str]]] = {
    "cache": view_columns(schemas.cache_schema(per_token=True)),
    "steps": view_columns(schemas.STEPS),
    "examples": view_columns(schemas.EXAMPLES),
    "evals": view_columns(schemas.EVALS),
    "pairs": view_columns(schemas.PAIRS),
    "example_images": view_columns(schemas.EXAMPLE_IMAGES),
}
SOURCE_COLUMN = {"cache": "cache_name", "steps": "run", "examples": "run", "evals": "run", "pairs": "run",
                 "example_images": "run"}
RUN_FILES = {"steps": "logs/steps-*.parquet", "examples": "logs/examples-*.parquet",
             "evals": "evals/*.parquet", "pairs": "pairs.parquet", "example_images": "logs/example_images-*.parquet"}
DISTINCT = {"example_images"}  # facts about examples, written again by each score: a row once, so joins stay 1:n
_NEEDS = {view: "--run DIR (or runs=[...])" for view in RUN_FILES} | {"cache": "--cache DIR (or caches=[...])"}


# ---------------------------------------------------------------------------------------------------------
# Sources and views.

def _source_names(dirs: Iterable[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """name -> directory; names are basenames, lengthened with parent folders until they are unique."""
    if isinstance(dirs, Mapping):
        return {str(k): Path(v) for k, v in dirs.items()}
    paths = [Path(d) for d in dirs]
    resolved = [p.resolve() for p in paths]
    depth = {i: 1 for i in range(len(paths))}
    while True:
        names = {i: "/".join(resolved[i].parts[-depth[i]:]) for i in depth}
        clashes = {i for i in names if list(names.values()).count(names[i]) > 1}
        if not clashes:
            return {names[i]: paths[i] for i in sorted(names)}
        grown = False
        for i in clashes:
            if depth[i] < len(resolved[i].parts):
                depth[i] += 1
                grown = True
        if not grown:  # the same directory given twice
            raise AnalysisError(f"{paths[min(clashes)]} was given more than once")


def _files(view: str, directory: Path) -> list[Path]:
    if view == "cache":
        return shard_paths(directory)
    return sorted(directory.glob(RUN_FILES[view]))


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Analysis:
    """A read-only DuckDB connection with the views over the given caches and runs.

    >>> a = connect(caches=["ref-cache"], runs=["run1"])
    >>> a.sql("SELECT split, max(step) AS last FROM steps GROUP BY split")   # a polars DataFrame
    >>> a.query("margin_histogram", bins=30, step="last")
    """

    def __init__(self, caches=(), runs=(), *, threads: int | None = None, memory_limit: str | None = None):
        self.caches = _source_names(caches)
        self.runs = _source_names(runs)
        self.views: dict[str, list[str]] = {}  # view -> the source names it holds rows of
        # DuckDB's default temp folder is <cwd>/.tmp, and DuckDB allows reading its temp folder whatever
        # allowed_paths says: a folder private to this session (0700, removed on close) leaks nothing.
        self.temp_dir = tempfile.mkdtemp(prefix="prefcache-sql-")
        self.con = duckdb.connect(":memory:")
        try:
            self._open(threads, memory_limit or default_memory_limit())
        except BaseException:
            self.close()
            raise

    def _open(self, threads: int | None, memory_limit: str) -> None:
        if threads:
            self.con.execute("SET threads = $n", {"n": threads})
        # Bounded: past the limit, sorts, joins and aggregates spill to the private temp folder.
        self.con.execute("SET memory_limit = $m", {"m": memory_limit})
        self.con.execute("SET temp_directory = $d", {"d": self.temp_dir})
        self.con.execute("SET enable_progress_bar = false")  # results go to stdout; no bar mixed into them
        self.con.execute("SET TimeZone = 'UTC'")
        # Parquet min/max statistics leave NaN out (as the format says), and DuckDB's statistics propagation
        # then folds isnan(x) and x > 0 to constants: a NaN check over a cache would always say "none".
        self.con.execute("SET disabled_optimizers = 'statistics_propagation'")
        for path in [*self.caches.values(), *self.runs.values()]:
            if not path.is_dir():
                raise AnalysisError(f"{path} is not a directory")
        allowed: list[str] = []
        if self.caches:
            allowed += self._create_view("cache", self.caches)
        if self.runs:
            found = {view: [name for name, d in self.runs.items() if _files(view, d)] for view in RUN_FILES}
            for name, d in self.runs.items():
                if not any(name in names for names in found.values()):
                    raise AnalysisError(f"{d} is not a run directory (no logs/*.parquet, evals/*.parquet or pairs.parquet)")
            for view in RUN_FILES:
                allowed += self._create_view(view, self.runs)
        # From here on the connection may read the views' files and nothing else, and may write nothing.
        self.con.execute("SET allowed_paths = $paths", {"paths": allowed})
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def _create_view(self, view: str, sources: dict[str, Path]) -> list[str]:
        columns = VIEWS[view]
        label = SOURCE_COLUMN[view]
        parts, used = [], []
        for name, directory in sources.items():
            files = [str(f.resolve()) for f in _files(view, directory)]
            if view == "cache" and not files:
                raise AnalysisError(f"{directory} is not a prefcache cache (no part-r*.parquet shards)")
            if files:
                parts.append((name, self.con.read_parquet(files, union_by_name=True)))
                used += files
        # Columns beyond the schema's pass through after them (NULL for sources that lack them).
        extras: dict[str, str] = {}
        for _, rel in parts:
            for col, typ in zip(rel.columns, rel.types, strict=True):
                if col not in dict(columns) and col != label:
                    extras.setdefault(col, str(typ))
        wanted = [*columns, *extras.items()]
        if not parts:  # no file for this view in any source: empty, but with the schema's columns
            # (only our own column names and types go into this text; no user value does)
            cols = ", ".join(f"CAST(NULL AS {t}) AS {_ident(c)}" for c, t in [(label, "VARCHAR"), *columns])
            self.con.sql(f"SELECT {cols} LIMIT 0").create_view(view)
            self.views[view] = []
            return used
        union = None
        for name, rel in parts:
            have = set(rel.columns)
            exprs = [duckdb.ConstantExpression(name).alias(label)]
            for col, typ in wanted:
                source = duckdb.ColumnExpression(col) if col in have else duckdb.ConstantExpression(None)
                exprs.append(source.cast(duckdb.sqltype(typ)).alias(col))
            rel = rel.select(*exprs)
            union = rel if union is None else union.union(rel)
        (union.distinct() if view in DISTINCT else union).create_view(view)
        self.views[view] = [name for name, _ in parts]
        return used

    # -- running queries -------------------------------------------------------------------------------

    def relation(self, query: str, **params) -> duckdb.DuckDBPyRelation:
        """The result of one read-only SELECT as a lazy DuckDB relation (``$name`` parameters bound)."""
        _check_read_only(query)
        try:
            return self.con.sql(query, params=params or None)
        except duckdb.Error as e:
            raise AnalysisError(self._explain(e)) from e

    def sql(self, query: str, fetch_rows: int | None = None, **params) -> pl.DataFrame:
        """The result of one read-only SELECT as a polars DataFrame; ``fetch_rows``: at most that many rows
        (a LIMIT on the relation: DuckDB stops producing rows there, nothing else is materialised)."""
        rel = self.relation(query, **params)
        if fetch_rows is not None:
            rel = rel.limit(fetch_rows)
        try:
            return rel.pl()
        except duckdb.Error as e:
            raise AnalysisError(self._explain(e)) from e

    def interruptible(self, work: Callable[[], object]):
        """Run ``work()`` in a worker thread so that Ctrl-C reaches us while DuckDB computes (the main
        thread's signal handler does not run inside a C call): on KeyboardInterrupt the query is
        interrupted (``connection.interrupt()``), the worker is joined, and KeyboardInterrupt re-raised."""
        outcome: dict[str, object] = {}
        # An Event, not Thread.join: a join interrupted by Ctrl-C marks a still-running thread as finished.
        done = threading.Event()

        def target():
            try:
                outcome["value"] = work()
            except BaseException as e:  # noqa: BLE001 - handed back to the main thread
                outcome["error"] = e
            finally:
                done.set()

        threading.Thread(target=target, name="prefcache-sql", daemon=True).start()
        try:
            while not done.wait(0.05):
                pass
        except KeyboardInterrupt:
            self.con.interrupt()
            done.wait(5)
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")

    def query(self, name: str, **params) -> pl.DataFrame:
        """A named query (see :func:`list_queries`); parameters not given take their defaults."""
        q = get_query(name)
        return self.sql(q.sql, **q.bind(params))

    def _explain(self, error: duckdb.Error) -> str:
        """DuckDB's message, on one line, saying what to do where we can tell."""
        text = str(error)
        m = re.search(r"Table with name (\S+) does not exist", text)
        if m:
            table = m.group(1).strip('"').lower()
            if table in VIEWS:
                return f"view {table} needs {_NEEDS[table]}; none was given"
            have = ", ".join(self.views) or "none (give --cache DIR or --run DIR)"
            return f"unknown view {m.group(1)}; the views here are: {have}"
        m = re.search(r"Values were not provided for the following (?:prepared statement )?parameters: (.*)", text)
        if m:
            return f"missing parameter {m.group(1).strip()}: bind it with --param NAME=VALUE (or a keyword argument)"
        m = re.search(r"identifiers of the excess parameters: (.*)", text)
        if m:
            return f"parameter {m.group(1).strip()} is not used by the query"
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
        # error('...') raised inside a named query arrives with this prefix; the rest says what is wrong
        return first.removeprefix("Invalid Input Error: ")

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_read_only(query: str) -> None:
    """Refuse anything but exactly one SELECT (DESCRIBE, SHOW, SUMMARIZE, WITH ... SELECT count as SELECT)."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise AnalysisError(next(line for line in str(e).splitlines() if line.strip())) from e
    if len(statements) != 1:
        raise AnalysisError(f"expected one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise AnalysisError(f"only read-only SELECT queries are allowed; this is a {kind.name} statement "
                            "(caches and logs are never modified)")


def default_memory_limit() -> str:
    """A quarter of the machine's memory (DuckDB's own default is 80%): a query that needs more spills."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "2GB"
    return f"{max(256, total // 4 // 2**20)}MiB"  # MiB: DuckDB's "MB" is 10**6 bytes


def connect(caches=(), runs=(), *, threads: int | None = None, memory_limit: str | None = None) -> Analysis:
    """Open a read-only analysis session over cache directories and run directories.

    ``caches`` / ``runs``: directories, or ``{name: directory}`` to choose the ``cache_name`` / ``run`` values.
    ``memory_limit``: DuckDB's (e.g. ``"4GB"``); default a quarter of the machine's memory, spilling beyond.
    """
    return Analysis(caches, runs, threads=threads, memory_limit=memory_limit)
