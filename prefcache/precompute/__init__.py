"""prefcache.precompute."""
