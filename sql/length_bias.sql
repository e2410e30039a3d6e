-- name: length_bias
-- description: Accuracy and reward margin by length bucket at one logged step per run, to see whether training favours longer (or shorter) answers.
-- param: step last Step per run: first, last, all, or a step number
-- param: split train Which split: train, eval, score, or all
-- param: length delta Length to bucket by: delta (chosen - rejected tokens), chosen, rejected, or total (prompt + both)
-- param: width 16 Bucket width in tokens
WITH sel AS (
    SELECT * FROM examples WHERE $split = 'all' OR split = $split
), resolved AS (
    SELECT run, CASE $step WHEN 'first' THEN min(step) WHEN 'last' THEN max(step) WHEN 'all' THEN NULL
                ELSE coalesce(TRY_CAST($step AS BIGINT), error('step must be first, last, all or a step number, not ' || $step)) END AS step
    FROM sel GROUP BY run
), picked AS (
    SELECT s.run, r.step, s.margin, s.reward_chosen, s.reward_rejected,
           CASE $length
               WHEN 'delta' THEN s.chosen_tokens - s.rejected_tokens
               WHEN 'chosen' THEN s.chosen_tokens
               WHEN 'rejected' THEN s.rejected_tokens
               WHEN 'total' THEN s.prompt_tokens + s.chosen_tokens + s.rejected_tokens
               ELSE error('length must be delta, chosen, rejected or total, not ' || $length)
           END AS length
    FROM sel s JOIN resolved r ON s.run = r.run AND ($step = 'all' OR s.step = r.step)
), bucketed AS (
    SELECT *, CAST(floor(length / CASE WHEN $width > 0 THEN $width ELSE error('width must be positive') END)
                   AS BIGINT) * $width AS bucket_lo
    FROM picked
)
SELECT run, any_value(step) AS step, $length AS length, bucket_lo, bucket_lo + $width AS bucket_hi,
       count(*) AS n,
       count(*) / sum(count(*)) OVER (PARTITION BY run) AS share,
       avg(CASE WHEN margin > 0 AND NOT isnan(margin) THEN 1.0 ELSE 0.0 END) AS accuracy,
       avg(margin) AS margin_mean,
       avg(reward_chosen) AS reward_chosen,
       avg(reward_rejected) AS reward_rejected
FROM bucketed
GROUP BY run, bucket_lo
ORDER BY run, bucket_lo
