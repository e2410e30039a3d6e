"""prefcache.cache.store."""
