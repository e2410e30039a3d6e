-- name: quant_audit
-- description: Two caches of the same data compared in aggregate (e.g. 4-bit against full precision; differences are b - a): ids in common, log-prob bias and error, reference-margin error, sign agreement and correlation, and the DPO logit shift beta * margin error.
-- param: cache_a required cache_name of the baseline cache (e.g. full precision)
-- param: cache_b required cache_name of the cache to audit (e.g. 4-bit)
-- param: beta 0.1 DPO beta, to express the margin error as a shift of the loss's logit
WITH checked AS (
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM cache WHERE cache_name = $cache_a)
            THEN error('cache_a ' || $cache_a || ' is not a cache_name here (see SELECT DISTINCT cache_name FROM cache)')
        WHEN NOT EXISTS (SELECT 1 FROM cache WHERE cache_name = $cache_b)
            THEN error('cache_b ' || $cache_b || ' is not a cache_name here (see SELECT DISTINCT cache_name FROM cache)')
    END AS problem
), a AS (
    SELECT id, any_value(chosen_logps) AS chosen, any_value(rejected_logps) AS rejected,
           any_value(chosen_tokens) AS chosen_tokens, any_value(rejected_tokens) AS rejected_tokens
    FROM cache WHERE cache_name = $cache_a GROUP BY id
), b AS (
    SELECT id, any_value(chosen_logps) AS chosen, any_value(rejected_logps) AS rejected,
           any_value(chosen_tokens) AS chosen_tokens, any_value(rejected_tokens) AS rejected_tokens
    FROM cache WHERE cache_name = $cache_b GROUP BY id
), both_ AS (
    SELECT b.chosen - a.chosen AS chosen_diff, b.rejected - a.rejected AS rejected_diff,
           a.chosen - a.rejected AS margin_a, b.chosen - b.rejected AS margin_b,
           a.chosen_tokens + a.rejected_tokens AS tokens,
           a.chosen_tokens <> b.chosen_tokens OR a.rejected_tokens <> b.rejected_tokens AS token_mismatch
    FROM a JOIN b USING (id)
)
SELECT $cache_a AS cache_a, $cache_b AS cache_b,
       (SELECT count(*) FROM a) AS n_a,
       (SELECT count(*) FROM b) AS n_b,
       count(*) AS n_common,
       (SELECT count(*) FROM a ANTI JOIN b USING (id)) AS only_a,
       (SELECT count(*) FROM b ANTI JOIN a USING (id)) AS only_b,
       count(*) FILTER (WHERE token_mismatch) AS token_mismatch,
       avg(chosen_diff) AS chosen_bias,
       avg(abs(chosen_diff)) AS chosen_mae,
       avg(rejected_diff) AS rejected_bias,
       avg(abs(rejected_diff)) AS rejected_mae,
       max(greatest(abs(chosen_diff), abs(rejected_diff))) AS max_abs_diff,
       sum(abs(chosen_diff) + abs(rejected_diff)) / sum(tokens) AS per_token_mae,
       avg(margin_b - margin_a) AS margin_bias,
       avg(abs(margin_b - margin_a)) AS margin_mae,
       max(abs(margin_b - margin_a)) AS margin_max_abs,
       corr(margin_a, margin_b) AS margin_corr,
       avg(CASE WHEN (margin_a > 0) = (margin_b > 0) THEN 1.0 ELSE 0.0 END) AS sign_agreement,
       $beta * avg(abs(margin_b - margin_a)) AS logit_shift_mae,
       $beta * max(abs(margin_b - margin_a)) AS logit_shift_max
FROM both_, checked
WHERE checked.problem IS NULL
