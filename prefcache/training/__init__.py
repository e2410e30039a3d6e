"""Training (``prefcache train``): only the policy is loaded; cached reference values stream into the losses.
``loop`` is the step loop; ``state`` a run's machinery (run directory, policy, optimizer, data order,
checkpoints); ``rundir``/``checkpoint``/``log``/``trackers`` what a run writes; ``config`` its options.
"""
