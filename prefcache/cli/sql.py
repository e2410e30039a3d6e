"""`prefcache sql`, `prefcache query` and `prefcache report`: thin click commands over prefcache.analysis.views.

Only click is imported at module level; DuckDB and polars load when a command runs.
"""

from __future__ import annotations

import click

from prefcache.cli.options import config_option
from prefcache.core.atomic import write_atomic, write_text_atomic

FORMATS = ("table", "csv", "json", "parquet")


def _source_options(f):
    f = click.option("--run", "runs", multiple=True, metavar="DIR", type=click.Path(exists=True, file_okay=False),
                     help="Run directory (logs/, evals/, pairs.parquet) for the views steps, examples, evals, "
                          "pairs. Repeat for several; the column `run` says which.")(f)
    f = click.option("--cache", "caches", multiple=True, metavar="DIR", type=click.Path(exists=True, file_okay=False),
                     help="Reference cache directory for the view `cache`. Repeat for several; the column "
                          "`cache_name` says which.")(f)
    return f


def _output_options(f):
    f = click.option("--max-rows", default=50, show_default=True,
                     help="Rows shown by --format table (0: all).")(f)
    f = click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result to this file.")(f)
    f = click.option("-f", "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
                     help="Output format; parquet needs --output.")(f)
    f = click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
                     help="Bind $NAME in the query. Repeat for several.")(f)
    return f


def _parse_params(items: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise click.ClickException(f"--param wants NAME=VALUE, got {item!r}")
        params[name.strip()] = value
    return params


def _guess_type(value: str):
    """Ad-hoc SQL has no header to type its parameters from: 3 is an int, 0.5 a float, the rest text."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _fetch_limit(fmt: str, max_rows: int) -> int | None:
    """A table shows max_rows: fetch one more (to say there are more), not the whole result."""
    return max_rows + 1 if fmt == "table" and max_rows > 0 else None


def emit(df, fmt: str, output: str | None, max_rows: int = 50) -> None:
    """Print or write a polars DataFrame as a table, CSV, JSON (an array of objects) or Parquet."""
    import polars as pl

    if fmt == "parquet":
        if not output:
            raise click.ClickException("--format parquet needs --output FILE")
        write_atomic(output, df.write_parquet)
        return
    if fmt == "csv":
        # CSV has no nested values: per-token log-prob lists become "[a, b, ...]" text
        lists = [c for c, t in df.schema.items() if isinstance(t, (pl.List, pl.Array))]
        df = df.with_columns(pl.format("[{}]", pl.col(c).list.eval(pl.element().cast(pl.String)).list.join(", ")).alias(c)
                             for c in lists)
        text = df.write_csv()
    elif fmt == "json":
        text = df.write_json() + "\n"
    else:
        more = max_rows > 0 and len(df) > max_rows  # the query fetched max_rows + 1 rows, no more
        shown = df if max_rows <= 0 else df.head(max_rows)
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True,
                       tbl_formatting="UTF8_FULL_CONDENSED", fmt_str_lengths=60, tbl_width_chars=10_000,
                       float_precision=None):
            text = str(shown) + "\n"
        if more:
            text += f"({len(shown)} rows shown, more not fetched; --max-rows 0 shows all, --format csv exports)\n"
        else:
            text += f"({len(df)} row{'s' if len(df) != 1 else ''})\n"
    if output:
        write_text_atomic(output, text)
    else:
        click.echo(text, nl=False)


def _run(caches, runs, work):
    """Open the analysis session and run `work(session)`, turning every expected failure into one line."""
    import duckdb

    from prefcache.analysis.views import AnalysisError, connect

    try:
        with connect(caches=caches, runs=runs) as session:
            return session.interruptible(lambda: work(session))  # Ctrl-C stops the query itself
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        raise click.exceptions.Exit(130) from None
    except (AnalysisError, duckdb.Error, OSError) as e:
        raise click.ClickException(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e


@click.command("sql")
@config_option
@click.argument("query")
@_source_options
@_output_options
def sql_cmd(query, caches, runs, params, fmt, output, max_rows):
    """Run a read-only SQL QUERY (DuckDB) over caches and runs.

    \b
    Views: cache (with --cache), steps, examples, evals, pairs (with --run).
    Example:
      prefcache sql "SELECT cache_name, count(*) AS n, avg(chosen_tokens) FROM cache GROUP BY ALL" \\
          --cache ref-fp --cache ref-4bit
      prefcache sql "SELECT * FROM steps WHERE step >= \\$from" --run run1 -p from=100 -f csv
    """
    bound = {k: _guess_type(v) for k, v in _parse_params(params).items()}
    df = _run(caches, runs, lambda s: s.sql(query, fetch_rows=_fetch_limit(fmt, max_rows), **bound))
    emit(df, fmt, output, max_rows)


@click.command("query")
@config_option
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the named queries and their parameters.")
@click.option("--show-sql", is_flag=True, help="Print the query's SQL instead of running it.")
@_source_options
@_output_options
def query_cmd(name, list_, show_sql, caches, runs, params, fmt, output, max_rows):
    """Run the named query NAME (one file in sql/) over caches and runs.

    \b
    Example:
      prefcache query --list
      prefcache query margin_histogram --run run1 --param bins=30 --param step=first
      prefcache query quant_audit --cache ref-fp --cache ref-4bit -p cache_a=ref-fp -p cache_b=ref-4bit
    """
    from prefcache.analysis.queries import AnalysisError, get_query, list_queries

    try:
        if list_:
            for q in list_queries():
                click.echo(f"{q.name}\n  {q.description}")
                for p in q.params:
                    default = "(required)" if p.required else f"[default: {p.default}]"
                    click.echo(f"  --param {p.name}={p.type.__name__.upper()}  {p.description} {default}")
            return
        if not name:
            raise click.UsageError("give a query NAME, or --list")
        q = get_query(name)
        if show_sql:
            click.echo(q.sql)
            return
        bound = q.bind(_parse_params(params))
    except AnalysisError as e:
        raise click.ClickException(str(e)) from e
    df = _run(caches, runs, lambda s: s.sql(q.sql, fetch_rows=_fetch_limit(fmt, max_rows), **bound))
    emit(df, fmt, output, max_rows)


@click.command("report")
@config_option
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="HTML file to write  [default: RUN_DIR/report.html]")
def report_cmd(run_dir, out):
    """Write a self-contained HTML report of RUN_DIR: curves, margin histograms, length bias.

    \b
    Example:
      prefcache report run1 --out run1.html
    """
    import duckdb

    from prefcache.analysis.report import write_report
    from prefcache.analysis.views import AnalysisError

    try:
        path = write_report(run_dir, out)
    except (AnalysisError, duckdb.Error, OSError) as e:
        raise click.ClickException(str(e).strip().splitlines()[0]) from e
    click.echo(f"wrote {path}")
