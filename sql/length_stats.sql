-- name: length_stats
-- description: Chosen-vs-rejected length statistics per cache (token counts after truncation): means, medians, p90, max, which side is longer, truncation, and mean reference log-prob per token.
SELECT cache_name,
       count(*) AS n,
       avg(prompt_tokens) AS prompt_mean,
       avg(chosen_tokens) AS chosen_mean,
       avg(rejected_tokens) AS rejected_mean,
       quantile_cont(chosen_tokens, 0.5) AS chosen_median,
       quantile_cont(rejected_tokens, 0.5) AS rejected_median,
       quantile_cont(chosen_tokens, 0.9) AS chosen_p90,
       quantile_cont(rejected_tokens, 0.9) AS rejected_p90,
       max(chosen_tokens) AS chosen_max,
       max(rejected_tokens) AS rejected_max,
       avg(chosen_tokens - rejected_tokens) AS delta_mean,
       avg(CASE WHEN chosen_tokens > rejected_tokens THEN 1.0 ELSE 0.0 END) AS chosen_longer,
       avg(CASE WHEN chosen_tokens < rejected_tokens THEN 1.0 ELSE 0.0 END) AS rejected_longer,
       avg(CASE WHEN chosen_tokens = rejected_tokens THEN 1.0 ELSE 0.0 END) AS same_length,
       avg(CASE WHEN chosen_truncated THEN 1.0 ELSE 0.0 END) AS chosen_truncated,
       avg(CASE WHEN rejected_truncated THEN 1.0 ELSE 0.0 END) AS rejected_truncated,
       avg(chosen_logps / nullif(chosen_tokens, 0)) AS chosen_logps_per_token,
       avg(rejected_logps / nullif(rejected_tokens, 0)) AS rejected_logps_per_token
FROM cache
GROUP BY cache_name
ORDER BY cache_name
