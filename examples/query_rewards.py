"""Query a reference cache and a training run with SQL (DuckDB), results as polars DataFrames.

    python examples/query_rewards.py                              # runs/example/cache and runs/example/run
    python examples/query_rewards.py --cache CACHE --run RUN --query margin_histogram

`prefcache.connect` opens a read-only, in-memory DuckDB with one view per kind of file: `cache` (the
reference cache), `steps` and `examples` (the run's logs), `evals` (eval/score results) and `pairs` (the
run's texts). Named queries live in sql/*.sql (`prefcache query --list`); ad-hoc SQL binds `$name`
parameters, never pastes values into the text. The same as the CLI:

    prefcache query reward_summary --run RUN
    prefcache sql "SELECT ... FROM examples JOIN cache USING (id) ..." --cache CACHE --run RUN -p step=4
"""

from __future__ import annotations

import argparse

import polars as pl

import prefcache

# Per pair at one logged step: did training widen the margin the reference already had?
PER_PAIR = """
SELECT e.split,
       count(*)                                                 AS pairs,
       avg(c.chosen_logps - c.rejected_logps)                   AS ref_logp_margin,
       avg(e.margin)                                            AS reward_margin,
       avg(CASE WHEN e.margin > 0 THEN 1.0 ELSE 0.0 END)        AS accuracy,
       avg(c.chosen_tokens - c.rejected_tokens)                 AS length_delta
FROM examples e JOIN cache c USING (id)
WHERE e.step = $step
GROUP BY e.split
ORDER BY e.split
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="runs/example/cache", help="reference cache directory")
    ap.add_argument("--run", default="runs/example/run", help="run directory (prefcache train --out)")
    ap.add_argument("--query", default="reward_summary", help="a named query (sql/*.sql)")
    ap.add_argument("--step", type=int, default=None, help="step for the ad-hoc query [default: the last]")
    args = ap.parse_args()

    pl.Config.set_tbl_cols(-1)
    pl.Config.set_tbl_width_chars(200)
    with prefcache.connect(caches=[args.cache], runs=[args.run]) as db:
        print(f"views: {', '.join(db.views)}")

        print(f"\n== named query {args.query}")
        print(db.query(args.query))  # parameters not given take the defaults in the .sql header

        print("\n== length_stats over the cache (some of its columns)")
        print(db.query("length_stats").select("cache_name", "n", "prompt_mean", "chosen_mean", "rejected_mean",
                                              "chosen_truncated", "chosen_logps_per_token", "rejected_logps_per_token"))

        step = args.step if args.step is not None else db.sql("SELECT max(step) AS s FROM examples")["s"][0]
        print(f"\n== ad-hoc SQL: the run's rewards joined to the cache by id, at step {step}")
        print(db.sql(PER_PAIR, step=step))


if __name__ == "__main__":
    main()
