-- name: quant_audit_pairs
-- description: Two caches of the same data compared per example (differences are b - a), the largest reference-margin changes first.
-- param: cache_a required cache_name of the baseline cache (e.g. full precision)
-- param: cache_b required cache_name of the cache to audit (e.g. 4-bit)
-- param: beta 0.1 DPO beta, to express the margin change as a shift of the loss's logit
-- param: limit 50 Rows (-1: all)
WITH checked AS (
    SELECT CASE
        WHEN NOT EXISTS (SELECT 1 FROM cache WHERE cache_name = $cache_a)
            THEN error('cache_a ' || $cache_a || ' is not a cache_name here (see SELECT DISTINCT cache_name FROM cache)')
        WHEN NOT EXISTS (SELECT 1 FROM cache WHERE cache_name = $cache_b)
            THEN error('cache_b ' || $cache_b || ' is not a cache_name here (see SELECT DISTINCT cache_name FROM cache)')
    END AS problem
), a AS (
    SELECT * FROM cache WHERE cache_name = $cache_a
    QUALIFY row_number() OVER (PARTITION BY id) = 1
), b AS (
    SELECT * FROM cache WHERE cache_name = $cache_b
    QUALIFY row_number() OVER (PARTITION BY id) = 1
), compared AS (
    SELECT a.id, a.chosen_tokens, a.rejected_tokens,
           a.chosen_tokens = b.chosen_tokens AND a.rejected_tokens = b.rejected_tokens AS tokens_match,
           a.chosen_logps AS chosen_a, b.chosen_logps AS chosen_b, b.chosen_logps - a.chosen_logps AS chosen_diff,
           a.rejected_logps AS rejected_a, b.rejected_logps AS rejected_b,
           b.rejected_logps - a.rejected_logps AS rejected_diff,
           a.chosen_logps - a.rejected_logps AS margin_a, b.chosen_logps - b.rejected_logps AS margin_b
    FROM a JOIN b USING (id), checked
    WHERE checked.problem IS NULL
)
SELECT *, margin_b - margin_a AS margin_diff, $beta * (margin_b - margin_a) AS logit_shift,
       (margin_a > 0) <> (margin_b > 0) AS sign_flip
FROM compared
ORDER BY abs(margin_b - margin_a) DESC, id
LIMIT CASE WHEN $limit < 0 THEN NULL ELSE $limit END
