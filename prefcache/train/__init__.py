"""prefcache.train."""
