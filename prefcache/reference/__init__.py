"""The reference pass (``prefcache precompute``): the frozen reference model over the data, shard by shard,
into a cache; resumable, incremental, one writer per cache. ``config`` holds its options.
"""
