-- name: margin_histogram
-- description: Histogram of reward margins at one logged step per run: equal-width buckets from lo to hi (every bucket listed, empty ones with n = 0).
-- param: step last Step per run: first, last, all, or a step number
-- param: split train Which split: train, eval, score, or all
-- param: bins 20 Number of buckets
-- param: lo auto Lower edge (auto: the smallest margin); margins outside [lo, hi] count in the end buckets
-- param: hi auto Upper edge (auto: the largest margin)
WITH sel AS (
    SELECT run, step, margin FROM examples
    WHERE ($split = 'all' OR split = $split) AND margin IS NOT NULL AND NOT isnan(margin)
), resolved AS (
    SELECT run, CASE $step WHEN 'first' THEN min(step) WHEN 'last' THEN max(step) WHEN 'all' THEN NULL
                ELSE coalesce(TRY_CAST($step AS BIGINT), error('step must be first, last, all or a step number, not ' || $step)) END AS step
    FROM sel GROUP BY run
), picked AS (
    SELECT s.run, r.step, s.margin
    FROM sel s JOIN resolved r ON s.run = r.run AND ($step = 'all' OR s.step = r.step)
), edges AS (
    SELECT run, any_value(step) AS step, count(*) AS total,
           CASE WHEN $lo = 'auto' THEN min(margin) ELSE CAST($lo AS DOUBLE) END AS lo,
           CASE WHEN $hi = 'auto' THEN max(margin) ELSE CAST($hi AS DOUBLE) END AS hi
    FROM picked GROUP BY run
), binned AS (
    SELECT p.run,
           -- all margins equal (hi = lo): everything in bucket 0
           -- clamped before the cast, so +-inf margins land in the end buckets instead of failing the cast
           coalesce(CAST(greatest(0, least($bins - 1,
               floor((p.margin - e.lo) / nullif(e.hi - e.lo, 0) * $bins))) AS BIGINT), 0) AS bucket,
           count(*) AS n
    FROM picked p JOIN edges e USING (run)
    GROUP BY ALL
), grid AS (
    SELECT run, step, total, lo, hi,
           unnest(range(CASE WHEN $bins >= 1 THEN $bins ELSE error('bins must be at least 1') END)) AS bucket
    FROM edges
)
SELECT g.run, g.step, g.bucket,
       g.lo + (g.hi - g.lo) * g.bucket / $bins AS bucket_lo,
       g.lo + (g.hi - g.lo) * (g.bucket + 1) / $bins AS bucket_hi,
       coalesce(b.n, 0) AS n,
       coalesce(b.n, 0) / g.total AS fraction
FROM grid g LEFT JOIN binned b USING (run, bucket)
ORDER BY g.run, g.bucket
