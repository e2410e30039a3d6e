"""prefcache.evaluate."""
