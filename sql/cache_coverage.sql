-- name: cache_coverage
-- description: Per cache: rows, distinct and duplicate ids, coverage of all ids seen in the given caches, and rows with NULL, NaN, infinite or impossible values (a log-prob above 0, a prefix sum below the full sum, an empty completion).
WITH all_ids AS (
    SELECT count(DISTINCT id) AS n FROM cache
)
SELECT cache_name,
       count(*) AS rows,
       count(DISTINCT id) AS ids,
       count(*) - count(DISTINCT id) AS duplicate_ids,
       any_value(a.n) - count(DISTINCT id) AS missing_ids,
       count(DISTINCT id) / any_value(a.n) AS coverage,
       count(*) FILTER (WHERE chosen_logps IS NULL OR rejected_logps IS NULL
                           OR chosen_logps_prefix IS NULL OR rejected_logps_prefix IS NULL) AS null_rows,
       count(*) FILTER (WHERE isnan(chosen_logps) OR isnan(rejected_logps)
                           OR isnan(chosen_logps_prefix) OR isnan(rejected_logps_prefix)) AS nan_rows,
       count(*) FILTER (WHERE isinf(chosen_logps) OR isinf(rejected_logps)
                           OR isinf(chosen_logps_prefix) OR isinf(rejected_logps_prefix)) AS inf_rows,
       -- (DuckDB orders NaN above every number, so NaN is kept out of the comparisons)
       count(*) FILTER (WHERE (chosen_logps > 0 AND NOT isnan(chosen_logps))
                           OR (rejected_logps > 0 AND NOT isnan(rejected_logps))) AS positive_logps,
       -- every token log-prob is <= 0, so the sum over a prefix can only be >= the full sum
       count(*) FILTER (WHERE (chosen_logps_prefix < chosen_logps - 1e-4 AND isfinite(chosen_logps))
                           OR (rejected_logps_prefix < rejected_logps - 1e-4 AND isfinite(rejected_logps))) AS bad_prefix,
       count(*) FILTER (WHERE chosen_tokens <= 0 OR rejected_tokens <= 0) AS empty_completions,
       count(*) FILTER (WHERE chosen_truncated OR rejected_truncated) AS truncated
FROM cache, all_ids a
GROUP BY cache_name
ORDER BY cache_name
