"""Training (``prefcache train``): only the policy is loaded; cached reference values stream into the losses.
``loop`` is the one step loop; ``task`` what it asks of a kind of example, ``pairs`` and ``unpaired`` the two
kinds; ``state`` a run's machinery (policy, optimizer, data order, :class:`~prefcache.training.state.RunState`);
``checkpoint``/``rundir``/``log``/``trackers`` what a run writes; ``guards`` its refusals; ``config`` its options.
"""
