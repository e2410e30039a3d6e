-- name: hardest_pairs
-- description: The pairs with the most negative reward margin at one logged step per run (or, order widest, the largest), with their prompt and answers (from pairs).
-- param: step last Step per run: first, last, or a step number
-- param: order hardest hardest: most negative margins first; widest: largest margins first
-- param: split train Which split: train, eval, score, or all
-- param: limit 20 Pairs per run
WITH sel AS (
    SELECT * FROM examples WHERE ($split = 'all' OR split = $split) AND margin IS NOT NULL
      AND ($order IN ('hardest', 'widest') OR error('order must be hardest or widest, not ' || $order))
), resolved AS (
    SELECT run, CASE $step WHEN 'first' THEN min(step) WHEN 'last' THEN max(step)
                ELSE coalesce(TRY_CAST($step AS BIGINT), error('step must be first, last or a step number, not ' || $step)) END AS step
    FROM sel GROUP BY run
), hardest AS (
    SELECT s.run, s.step, s.split, s.id, s.margin, s.reward_chosen, s.reward_rejected,
           s.prompt_tokens, s.chosen_tokens, s.rejected_tokens
    FROM sel s JOIN resolved r ON s.run = r.run AND s.step = r.step
    QUALIFY row_number() OVER (PARTITION BY s.run ORDER BY CASE $order WHEN 'widest' THEN -s.margin ELSE s.margin END,
                                                     s.id) <= $limit
), texts AS (
    SELECT run, id, any_value(prompt) AS prompt, any_value(chosen) AS chosen, any_value(rejected) AS rejected
    FROM pairs WHERE (run, id) IN (SELECT (run, id) FROM hardest)
    GROUP BY run, id
)
SELECT h.*, t.prompt, t.chosen, t.rejected
FROM hardest h LEFT JOIN texts t USING (run, id)
ORDER BY h.run, CASE $order WHEN 'widest' THEN -h.margin ELSE h.margin END, h.id
