-- name: checkpoint_compare
-- description: Evaluation results per run, task and metric across checkpoints, each against a baseline checkpoint: delta and z = delta / combined stderr. The latest result wins when a checkpoint was evaluated twice.
-- param: task all Only this task, or all
-- param: baseline first Checkpoint to compare against: first (base if evaluated, else the earliest step), base (the base model: checkpoint 'base', step NULL), or a checkpoint name
WITH latest AS (
    SELECT * FROM evals
    WHERE $task = 'all' OR task = $task
    QUALIFY row_number() OVER (PARTITION BY run, source, checkpoint, task, metric ORDER BY time DESC NULLS LAST) = 1
), base AS (
    SELECT run, source, task, metric, coalesce(checkpoint, 'base') AS baseline, value AS base_value, stderr AS base_stderr
    FROM latest
    WHERE $baseline = 'first' OR coalesce(checkpoint, 'base') = $baseline
    QUALIFY row_number() OVER (PARTITION BY run, source, task, metric ORDER BY step NULLS FIRST, checkpoint) = 1
)
SELECT l.run, l.source, l.task, l.metric, l.checkpoint, l.step, l.value, l.stderr, l.n,
       b.baseline, l.value - b.base_value AS delta,
       (l.value - b.base_value) / nullif(sqrt(l.stderr * l.stderr + b.base_stderr * b.base_stderr), 0) AS z
FROM latest l LEFT JOIN base b USING (run, source, task, metric)
ORDER BY l.run, l.source, l.task, l.metric, l.step NULLS FIRST, l.checkpoint
