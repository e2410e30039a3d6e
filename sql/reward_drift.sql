-- name: reward_drift
-- description: How each pair's implicit rewards moved between two logged steps (pairs logged at both), the pairs whose margin fell most first.
-- param: step_a first Earlier step per run: first, last, or a step number
-- param: step_b last Later step per run: first, last, or a step number
-- param: split train Which split: train, eval, score, or all
-- param: limit -1 Pairs per run (-1: all)
WITH sel AS (
    SELECT * FROM examples WHERE $split = 'all' OR split = $split
), resolved AS (
    SELECT run,
           CASE $step_a WHEN 'first' THEN min(step) WHEN 'last' THEN max(step)
                ELSE coalesce(TRY_CAST($step_a AS BIGINT), error('step_a must be first, last or a step number, not ' || $step_a)) END AS step_a,
           CASE $step_b WHEN 'first' THEN min(step) WHEN 'last' THEN max(step)
                ELSE coalesce(TRY_CAST($step_b AS BIGINT), error('step_b must be first, last or a step number, not ' || $step_b)) END AS step_b
    FROM sel GROUP BY run
), per_id AS (
    -- an id logged twice at one step counts once, averaged
    SELECT s.run, s.id, s.step, avg(s.margin) AS margin,
           avg(s.reward_chosen) AS reward_chosen, avg(s.reward_rejected) AS reward_rejected
    FROM sel s JOIN resolved r ON s.run = r.run AND s.step IN (r.step_a, r.step_b)
    GROUP BY s.run, s.id, s.step
), drift AS (
    SELECT r.run, a.id, r.step_a, r.step_b,
           a.margin AS margin_a, b.margin AS margin_b, b.margin - a.margin AS margin_drift,
           b.reward_chosen - a.reward_chosen AS reward_chosen_drift,
           b.reward_rejected - a.reward_rejected AS reward_rejected_drift,
           (a.margin > 0) <> (b.margin > 0) AS flipped
    FROM resolved r
    JOIN per_id a ON a.run = r.run AND a.step = r.step_a
    JOIN per_id b ON b.run = r.run AND b.id = a.id AND b.step = r.step_b
)
SELECT * FROM drift
QUALIFY $limit < 0 OR row_number() OVER (PARTITION BY run ORDER BY margin_drift, id) <= $limit
ORDER BY run, margin_drift, id
