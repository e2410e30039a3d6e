-- name: training_curves
-- description: The logged curves per run, split and step (from steps): loss, accuracy, margin, rewards, learning rate, gradient norm, throughput, padding share.
-- param: split all Which split: train, eval, or all
SELECT run, split, step, epoch, loss,
       rewards_accuracies AS accuracy,
       rewards_margins AS margin,
       rewards_chosen, rewards_rejected, logps_chosen, logps_rejected,
       lr, grad_norm, tokens_per_s, peak_mem_mb, time_s, padding_share
FROM steps
WHERE $split = 'all' OR split = $split
ORDER BY run, split, step, time_s
