"""The reference pass (``prefcache precompute``): the frozen reference model over the data, shard by shard,
into a cache; resumable, incremental, one writer per cache. ``shards`` is the one pass, ``kinds`` the kinds of
example it scores (pairs; unpaired examples with their KL completions), ``metadata`` what a cache records about
the pass that made it, ``config`` its options.
"""
