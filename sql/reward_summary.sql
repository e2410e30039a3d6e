-- name: reward_summary
-- description: Implicit rewards per run, split and logged step (from examples): mean rewards, margin mean/std/median, accuracy (share of margins > 0), with the logged loss from steps.
-- param: split all Which split: train, eval, score, or all
WITH per_step AS (
    SELECT run, split, checkpoint, step,
           count(*) AS n,
           avg(reward_chosen) AS reward_chosen,
           avg(reward_rejected) AS reward_rejected,
           avg(margin) AS margin_mean,
           stddev_samp(margin) AS margin_std,
           quantile_cont(margin, 0.5) AS margin_median,
           -- a tie is not a win, as in TRL's rewards/accuracies
           avg(CASE WHEN margin > 0 AND NOT isnan(margin) THEN 1.0 ELSE 0.0 END) AS accuracy
    FROM examples
    WHERE $split = 'all' OR split = $split
    GROUP BY run, split, checkpoint, step
), logged AS (
    -- a resumed run can log a step twice: keep the later line
    SELECT run, split, step, epoch, loss
    FROM steps
    QUALIFY row_number() OVER (PARTITION BY run, split, step ORDER BY time_s DESC NULLS LAST) = 1
)
SELECT p.run, p.split, p.checkpoint, p.step, l.epoch, l.loss, p.n,
       p.reward_chosen, p.reward_rejected, p.margin_mean, p.margin_std, p.margin_median, p.accuracy
FROM per_step p
LEFT JOIN logged l ON l.run = p.run AND l.split = p.split AND l.step = p.step
ORDER BY p.run, p.split, p.checkpoint NULLS FIRST, p.step
