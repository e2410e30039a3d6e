"""prefcache.data.pairs."""
